"""The serving engine without Ray: continuous batching gives every row what it would get alone.

Two adapters and the bare base over one tiny base; requests arrive at different decode steps, with prompts of
different lengths, with and without an image, some with n > 1; each answer is compared token for token with
the reference greedy loop (tests/reference_decode.py) run on that request alone. Also: per-request seeded sampling, the logit processors,
log-probabilities, cancellation, and the asyncio scheduler (admission at the next step, cancel frees rows).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

import pytest
import torch
from conftest import perturb, random_images
from reference_decode import answer, greedy

from pipelines.serve_api import ApiError, ChatJob, Delta, End, SamplingParams

CLI = {"vision_layers": [0, 1, 2], "inject_layers": [0, 1], "attn_dim": 16, "heads": 4, "lora_rank": 4}


@pytest.fixture(scope="module")
def models():
    from cli_module.config import CLIConfig
    from cli_module.loading import load_base
    from cli_module.model import FusedVLM

    torch.manual_seed(0)
    base = load_base("tiny")
    plain, tuned = FusedVLM(base, CLIConfig(**CLI)), FusedVLM(base, CLIConfig(**CLI))
    perturb(tuned)
    return {"plain": plain.eval(), "tuned": tuned.eval(), "base": FusedVLM(base, CLIConfig(method="one_to_one")).eval()}


@pytest.fixture
def engine(models):
    from pipelines.serve_engine import Engine

    return Engine(models, max_rows=8, max_prompt_tokens=256)


def job(model: str, question: str, image=None, *, n: int = 1, max_tokens: int = 10, stop=(), **sampling) -> ChatJob:
    content = ("<image>\n" if image is not None else "") + question
    sampling = {"temperature": 0.0, "logprobs": True, **sampling}
    return ChatJob(model=model, messages=[{"role": "user", "content": content}],
                   images=[image] if image is not None else [], max_tokens=max_tokens, stop=list(stop),
                   sampling=SamplingParams(**sampling), n=n)


def alone(engine, models, item) -> list[int]:
    """The request decoded by itself with the reference greedy loop: its tokens up to and including EOS."""
    eos = engine.detok.eos_token_id
    tokens = greedy(models[item.job.model], item.ids, torch.ones_like(item.ids), visual=item.visual,
                    max_new_tokens=item.job.max_tokens, eos_token_id=eos)
    return answer(tokens[0].tolist(), eos)


def run(engine, arrivals: dict[int, list], steps: int = 200) -> dict[str, dict[int, list[Delta]]]:
    """Queue each list of prepared requests at its step, admit them first come first served as they fit (as the
    scheduler does), step until all ended -> request id -> choice -> deltas."""
    out: dict[str, dict[int, list[Delta]]] = {}
    ends: dict[str, End] = {}
    total = sum(len(v) for v in arrivals.values())
    waiting: deque = deque()
    for step in range(steps):
        waiting += arrivals.get(step, [])
        admit = []
        while waiting and engine.fits([*admit, waiting[0]]):
            admit.append(waiting.popleft())
        events = engine.add(admit) if admit else []
        if engine.rows:
            events += engine.step()
        for rid, event in events:
            assert rid not in ends, f"{rid}: an event after its End"
            if isinstance(event, End):
                assert event.error is None, event.error
                ends[rid] = event
            else:
                out.setdefault(rid, {}).setdefault(event.index, []).append(event)
        if not waiting and step >= max(arrivals, default=0) and not engine.rows:  # (also requests added before)
            assert len(ends) >= total and not engine.choices, sorted(ends)
            return out
    raise AssertionError(f"not done after {steps} steps: {sorted(ends)}")


def token_bytes(deltas: list[Delta]) -> list[list[int]]:
    return [entry["bytes"] for d in deltas for entry in d.logprobs or []]


def test_greedy_continuous_batching_equals_sequential(engine, models):
    images = random_images(4, seed=11)
    jobs = {  # request id -> (arrival step, job)
        "a": (0, job("tuned", "What is it?", images[0], max_tokens=12)),
        "b": (0, job("plain", "Describe this long thing in great detail, please, and slowly.", images[1], n=2)),
        "c": (2, job("base", "Hi", max_tokens=16)),
        "d": (3, job("tuned", "A text-only question for the CLI adapter", max_tokens=20)),
        "e": (3, job("tuned", "x", images[2], max_tokens=5)),
        "f": (7, job("base", "Short one with an image", images[3], n=3, max_tokens=6)),
        "g": (9, job("tuned", "Late arrival with a long prompt " * 4, images[0], max_tokens=8)),
    }
    batch = engine.prepare_many([(j, rid) for rid, (_, j) in jobs.items()])  # images encoded as one batch
    prepared = dict(zip(jobs, batch))
    arrivals: dict[int, list] = {}
    for rid, (step, _) in jobs.items():
        arrivals.setdefault(step, []).append(prepared[rid])
    got = run(engine, arrivals)
    eos = engine.detok.eos_token_id
    for rid, item in prepared.items():
        want = alone(engine, models, engine.prepare(jobs[rid][1], rid))  # prepared by itself, decoded by itself
        assert sorted(got[rid]) == list(range(item.job.n)), rid
        for index, deltas in got[rid].items():
            assert token_bytes(deltas) == [engine._token_bytes(t) for t in want if t != eos], (rid, index)
            assert deltas[-1].tokens == len(want) and deltas[-1].finish_reason in ("stop", "length")
            assert "".join(d.text for d in deltas) == engine.detok.decode([t for t in want if t != eos],
                                                                          skip_special_tokens=True)
    assert max(engine.batch_sizes) >= 4  # rows of different requests really shared decode steps


def test_seeded_sampling_is_reproducible_per_request(engine, models):
    image = random_images(1, seed=3)[0]
    sampled = job("tuned", "Tell me something.", image, n=2, max_tokens=12, temperature=1.0, seed=1234, top_p=0.95)

    def answers(prepared_others: list) -> list[list[list[int]]]:
        item = engine.prepare(sampled, "s")
        got = run(engine, {0: prepared_others[:1], 1: [item], 2: prepared_others[1:]})
        return [token_bytes(got["s"][i]) for i in range(2)]

    first = answers([])
    crowd = [engine.prepare(job("plain", f"other {i}", image, max_tokens=9, temperature=0.7, seed=i), f"o{i}")
             for i in range(3)]
    assert answers(crowd) == first  # the same with other requests in the batch
    assert first[0] != first[1]  # choice i draws from seed + i


def test_logit_processors(engine):
    from pipelines.sampler import BatchParams, RowState, choose, process_logits

    eos = engine.detok.eos_token_id
    forced = engine.prepare(job("base", "Hi", max_tokens=6, logit_bias={70: 100.0}), "forced")
    got = run(engine, {0: [forced]})["forced"][0]
    assert token_bytes(got) == [engine._token_bytes(70)] * 6
    late = engine.prepare(job("base", "Hi", max_tokens=8, logit_bias={eos: 100.0}, min_tokens=3), "late")
    got = run(engine, {0: [late]})["late"][0]
    assert got[-1].tokens == 4 and got[-1].finish_reason == "stop"  # EOS masked for 3 tokens, then forced

    def batch(*params: SamplingParams, vocab: int = 4) -> BatchParams:
        return BatchParams.of(list(params), [None] * len(params), vocab, torch.device("cpu"))

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    top1, greedy = SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.0)
    assert choose(logits, batch(top1, greedy)).tolist() == [3, 3]  # top_k 1 = greedy, vectorised beside greedy
    torch.manual_seed(0)
    min_p = batch(SamplingParams(temperature=1.0, min_p=0.3), SamplingParams(temperature=1.0, top_p=0.5))
    draws = [choose(logits, min_p).tolist() for _ in range(60)]
    assert {d[0] for d in draws} == {0, 3}  # min_p 0.3 keeps p >= 0.3 p_max: e^-1 (token 0) stays, e^-2.5, e^-4 go
    assert {d[1] for d in draws} == {3}  # top_p 0.5: token 3 alone holds 0.63 of the mass

    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       min_tokens=1)
    prompt = engine.prepare(job("base", "ab", max_tokens=4), "p").ids[0]
    state = RowState.new([p], [prompt], engine.vocab, torch.device("cpu"))
    state.counts[0, 70] = 2.0  # token 70 generated twice
    x = torch.zeros(engine.vocab)
    x[70], x[71], x[72] = 4.0, -4.0, 1.0
    seen = set(prompt.tolist()) | {70}
    want = torch.empty_like(x)
    for t in range(engine.vocab):  # expected, by the definitions in SamplingParams
        v = float(x[t])
        v = (v / 2.0 if v > 0 else v * 2.0) if t in seen else v
        want[t] = v - (0.25 * 2 + 0.5 if t == 70 else 0.0)
    want[eos] = float("-inf")  # min_tokens 1: no EOS at the first token
    got = process_logits(x[None].clone(), batch(p, vocab=engine.vocab), state, [eos])[0]
    assert torch.equal(got, want)  # every token of the vocabulary, as defined
    assert float(got[70]) == 4.0 / 2.0 - 1.0 and float(got[72]) == (0.5 if 72 in seen else 1.0)


def test_decode_steps_reuse_the_preallocated_kv_slots(engine):
    """No concatenation per token, no re-padding on admission: the batch's key storage stays the same tensor
    while rows decode, leave and join (a joining row takes a freed slot)."""
    first = engine.prepare(job("base", "Go on", max_tokens=40, min_tokens=40), "first")
    short = engine.prepare(job("base", "Short but a longer prompt", max_tokens=3, min_tokens=3), "short")
    engine.add([first, short])
    batch = engine.batches["base"]
    storage = batch.kv.keys[0].data_ptr()
    for _ in range(10):
        engine.step()  # "short" ends after its third token: its slot is free
    assert [r.request_id for r in batch.rows] == ["first"]
    second = engine.prepare(job("base", "Join", max_tokens=20, min_tokens=20), "second")
    engine.add([second])  # into the freed slot 1
    for _ in range(10):
        engine.step()
    assert batch.kv.keys[0].data_ptr() == storage
    # a request's first step writes its prompt and samples its first token; each later step writes one position
    assert batch.lengths == [first.prompt_tokens + 19, second.prompt_tokens + 9]
    engine.cancel({"first"})  # the second row moves into slot 0
    assert [r.request_id for r in batch.rows] == ["second"] and batch.lengths == [second.prompt_tokens + 9]
    engine.cancel({"second"})


def test_logprobs_are_the_models(engine, models):
    image = random_images(1, seed=4)[0]
    item = engine.prepare(job("tuned", "What?", image, max_tokens=3, top_logprobs=3), "lp")
    first = run(engine, {0: [item]})["lp"][0][0].logprobs[0]
    model = models["tuned"]
    with torch.no_grad():
        logits = model(item.ids, torch.ones_like(item.ids), visual=item.visual).logits[0, -1].float()
    logits[model.base.image_token_id] = float("-inf")
    want = torch.log_softmax(logits, -1)
    top = want.topk(3)
    assert math.isclose(first["logprob"], float(want.max()), abs_tol=1e-4)
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert first["top_logprobs"][0]["bytes"] == first["bytes"]  # greedy: the chosen token is the most likely


def test_prepare_many_isolates_bad_requests(engine):
    images = random_images(2, seed=6)
    jobs = [(job("tuned", "one", images[0]), "a"), (job("tuned", "word " * 300, images[1]), "long"),
            (job("tuned", "two", images[1], logit_bias={10**6: 1.0}), "bias"), (job("base", "text"), "c"),
            (job("tuned", "three", images[1]), "b")]
    results = dict(zip([rid for _, rid in jobs], engine.prepare_many(jobs)))
    assert isinstance(results["long"], ApiError) and results["long"].code == "context_length_exceeded"
    assert isinstance(results["bias"], ApiError) and results["bias"].param == "logit_bias"
    for rid, j in [("a", jobs[0][0]), ("c", jobs[3][0]), ("b", jobs[4][0])]:
        single = engine.prepare(j, rid)
        assert torch.equal(results[rid].ids, single.ids), rid
        if single.visual is not None:
            assert results[rid].visual.counts == single.visual.counts
            assert torch.allclose(results[rid].visual.image_embeds, single.visual.image_embeds, atol=1e-5)
            assert torch.allclose(results[rid].visual.kv[0][0], single.visual.kv[0][0], atol=1e-5)


def test_prepare_limits(engine):
    with pytest.raises(ApiError, match="over max_prompt_tokens=256") as err:
        engine.prepare(job("base", "word " * 300), "long")
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="outside this model's vocabulary") as err:
        engine.prepare(job("base", "hi", logit_bias={10**6: 1.0}), "bias")
    assert err.value.param == "logit_bias"
    with pytest.raises(ApiError, match="exceeds the model's context of 512"):
        engine.prepare(job("base", "hi", max_tokens=600), "ctx")


def test_cancel_frees_rows_at_the_next_step(engine):
    long = engine.prepare(job("base", "Go on", max_tokens=200, min_tokens=200), "long")
    other = engine.prepare(job("base", "Also", max_tokens=50, min_tokens=50), "other")
    engine.add([long, other])
    for _ in range(5):
        engine.step()
    assert engine.rows == 2
    engine.cancel({"long"})
    assert engine.rows == 1
    events = engine.step()
    assert {rid for rid, _ in events} == {"other"}
    engine.cancel({"other"})
    assert engine.rows == 0 and not engine.choices


def test_scheduler_admits_at_the_next_step_and_cancels(engine):
    from pipelines.serve_scheduler import Scheduler

    async def scenario() -> tuple[int, int, int]:
        scheduler = Scheduler(engine)
        long = engine.prepare(job("base", "Keep going", max_tokens=400, min_tokens=400), "long")
        stream = scheduler.submit(long)
        for _ in range(20):  # the long request is decoding
            assert isinstance(await stream.get(), Delta)
        steps_before = sum(engine.batch_sizes.values())
        short = scheduler.submit(engine.prepare(job("base", "Quick", max_tokens=3), "short"))
        first = await short.get()
        assert isinstance(first, Delta)
        admitted_after = sum(engine.batch_sizes.values()) - steps_before  # decode steps it waited
        while not isinstance(await short.get(), End):
            pass
        generated = engine.generated["base"]
        scheduler.cancel("long")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if engine.rows == 0:
                break
        return admitted_after, engine.generated["base"] - generated, engine.rows

    waited, after_cancel, rows = asyncio.run(scenario())
    assert waited <= 2  # joined the running batch at the next step, not after the 400-token generation
    assert after_cancel <= 2 and rows == 0  # the cancelled row stopped within a step


def test_preparer_batches_requests_that_arrive_together(engine):
    from pipelines.serve_scheduler import Preparer

    calls = []
    prepare_many = engine.prepare_many
    engine.prepare_many = lambda jobs: calls.append(len(jobs)) or prepare_many(jobs)
    images = random_images(4, seed=7)

    async def scenario() -> list:
        preparer = Preparer(engine, max_batch=8)
        asks = [preparer.prepare(job("tuned", f"q{i}", images[i]), f"r{i}") for i in range(4)]
        asks.append(preparer.prepare(job("tuned", "word " * 300), "long"))
        return await asyncio.gather(*asks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert calls == [5]  # one prepare_many call: the four images were encoded as one batch
    assert [r.request_id for r in results[:4]] == ["r0", "r1", "r2", "r3"]
    assert isinstance(results[4], ApiError) and results[4].code == "context_length_exceeded"


# --- chunked prefill under the step token budget, admission by KV memory -------------------------------------------


def chunked_engine(models, budget: int, max_rows: int = 4, **kwargs):
    from pipelines.serve_engine import Engine

    return Engine(models, max_rows=max_rows, max_prompt_tokens=256, max_step_tokens=budget, **kwargs)


def decoded(engine, deltas: list[Delta]) -> list[list[int]]:
    return token_bytes(deltas)


def exact(engine, models, item, deltas: list[Delta]) -> None:
    """The choice's tokens are the reference loop's, and each one's log-probability is the model's in one forward
    over the prompt and the answer (the tiny model often repeats one token: the values catch a wrong KV slot)."""
    eos = engine.detok.eos_token_id
    tokens = [t for t in alone(engine, models, item) if t != eos]
    assert decoded(engine, deltas) == [engine._token_bytes(t) for t in tokens], item.request_id
    model = models[item.job.model]
    ids = torch.cat([item.ids, torch.tensor([tokens], dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), visual=item.visual).logits[0, item.prompt_tokens - 1:-1].float()
    logits[:, model.base.image_token_id] = float("-inf")
    want = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    got = [entry["logprob"] for d in deltas for entry in d.logprobs or []]
    assert got == pytest.approx(want.tolist(), abs=1e-4), item.request_id


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_chunked_prefill_equals_whole_prefill_and_the_reference(models, with_image):
    """A prompt longer than the step budget, prefilled over several steps (an image's tokens split between
    chunks), gives the greedy tokens of the same request prefilled whole and of the reference loop; so does a
    request with n = 2 prefilled in the same chunk forward as another (its slots read by a gather)."""
    image = random_images(1, seed=21)[0] if with_image else None
    long = job("tuned", "Please describe every single detail of this in a long answer " * 2, image, max_tokens=10)
    pair = job("tuned", "Two answers", image, n=2, max_tokens=6)
    after = job("tuned", "And one more", max_tokens=6)
    answers = {}
    for budget in (512, 8):
        engine = chunked_engine(models, budget)
        items = [engine.prepare(long, "long"), engine.prepare(pair, "pair"), engine.prepare(after, "after")]
        if budget == 8:
            prompt = items[0].ids[0]
            assert prompt.shape[0] > 4 * budget  # several chunks
            if with_image:  # a chunk boundary falls inside the image's tokens
                at = (prompt == engine.image_token_id).nonzero()[:, 0]
                assert any(int(at[0]) < b <= int(at[-1]) for b in range(0, prompt.shape[0], budget))
        got = run(engine, {0: items})
        assert max(engine.step_tokens) <= budget
        answers[budget] = {rid: {i: decoded(engine, d) for i, d in got[rid].items()} for rid in got}
        for item in items:
            for i in range(item.job.n):
                exact(engine, models, item, got[item.request_id][i])
        if budget == 8:  # the long prompt really was prefilled over several steps: its first token came late
            assert sum(engine.step_tokens.values()) > items[0].prompt_tokens // budget
    assert answers[8] == answers[512]


def test_chunked_prefill_splits_deepstack_image_tokens(models):
    """deepstack adds its per-position tokens at the image positions: a chunk that holds part of the image gets
    the matching slice of them."""
    from cli_module.config import CLIConfig
    from cli_module.model import FusedVLM

    deep = FusedVLM(models["base"].base, CLIConfig(method="deepstack", vision_layers=[0, 1], inject_layers=[0, 1]))
    perturb(deep, seed=1)
    engine = chunked_engine({"deep": deep.eval()}, 8)
    item = engine.prepare(job("deep", "What is in it?", random_images(1, seed=24)[0], max_tokens=6), "deep")
    at = (item.ids[0] == engine.image_token_id).nonzero()[:, 0]
    assert any(int(at[0]) < b <= int(at[-1]) for b in range(0, item.prompt_tokens, 8))  # split by a chunk
    exact(engine, {"deep": deep}, item, run(engine, {0: [item]})["deep"][0])


def test_running_rows_decode_every_step_while_a_long_prompt_prefills(models):
    budget = 12
    engine = chunked_engine(models, budget)
    image = random_images(1, seed=22)[0]
    runners = [engine.prepare(job("tuned", f"Keep going {i}", max_tokens=60, min_tokens=60), f"r{i}") for i in range(2)]
    long = engine.prepare(job("tuned", "A very long question about this picture, " * 4, image, max_tokens=5), "long")
    engine.add(runners)
    while len(engine.batches["tuned"].rows) < 2:  # their prompts take a few steps too
        engine.step()
    engine.add([long])
    steps, per_step = 0, []
    first_token = None
    while first_token is None:
        events = engine.step()
        steps += 1
        per_step.append(sorted(rid for rid, e in events if isinstance(e, Delta) and rid != "long"))
        if any(rid == "long" for rid, _ in events):
            first_token = [e for rid, e in events if rid == "long"][0]
    chunk = budget - len(runners)  # each step: 2 decode tokens, the rest of the budget on the long prompt
    assert steps == -(-long.prompt_tokens // chunk) > 3  # its first token after its last chunk, not before
    assert per_step == [["r0", "r1"]] * steps  # every running row got a token at every one of those steps
    assert max(engine.step_tokens) <= budget
    assert engine.step_tokens[budget] >= steps - 1  # the budget was used in full while the prompt was prefilled
    rest = run(engine, {})
    exact(engine, models, long, [first_token, *rest["long"][0]])


def test_cancel_during_chunked_prefill_frees_its_slot(models):
    """A request cancelled between its chunks leaves: its slots, image slot and KV bytes are free; a decoding row
    leaving while another prompt is half written moves that prompt's slot down; every remaining answer is exact."""
    engine = chunked_engine(models, 8, max_rows=6)
    image = random_images(1, seed=23)[0]
    runner = engine.prepare(job("tuned", "Go on", image, max_tokens=30, min_tokens=30), "runner")
    other = engine.prepare(job("tuned", "Go on too", max_tokens=40, min_tokens=40), "other")
    long = engine.prepare(job("tuned", "This prompt is long enough for many chunks " * 3, image, n=2), "long")
    behind = engine.prepare(job("tuned", "Behind it, a question of some length", image, max_tokens=8), "behind")
    batch = engine._batch("tuned")
    events = engine.add([runner, other])
    while len(batch.rows) < 2:
        events += engine.step()
    engine.add([long, behind])
    for _ in range(2):
        events += engine.step()
    assert [p.item.request_id for p in batch.prefilling] == ["long", "behind"] and 0 < batch.prefilling[0].done
    assert engine.rows == 5 and engine.kv.reserved == sum(engine._need(i) for i in (runner, other, long, behind))
    engine.cancel({"long"})  # mid-prefill
    assert engine.rows == 3 and [p.item.request_id for p in batch.prefilling] == ["behind"]
    assert engine.kv.reserved == sum(engine._need(i) for i in (runner, other, behind)) and "long" not in engine.choices
    assert sum(batch.images.refs) == 2  # runner's and behind's images; long's slot (2 references) released
    for _ in range(2):
        events += engine.step()
    assert 0 < batch.prefilling[0].done < behind.prompt_tokens  # behind's prompt is half written
    engine.cancel({"runner"})  # a decoding row leaves: "other" moves to slot 0, behind's slot moves down
    assert [r.request_id for r in batch.rows] == ["other"]
    got: dict[str, list[Delta]] = {}
    for rid, e in events:
        if isinstance(e, Delta):
            got.setdefault(rid, []).append(e)
    for rid, deltas in run(engine, {}).items():
        got.setdefault(rid, []).extend(deltas[0])
    assert "long" not in got
    for item in (other, behind):
        exact(engine, models, item, got[item.request_id])
    assert engine.kv.reserved == 0 and engine.rows == 0 and sum(batch.images.refs) == 0


def test_admission_waits_for_kv_memory_first_come_first_served(models):
    """With room for one long request's KV bytes, the next waits until it ends (rows are free all along); a
    large request at the head of the queue is not overtaken by a small one that would fit."""
    from pipelines.kv_budget import bytes_per_token
    from pipelines.serve_scheduler import Scheduler

    per = bytes_per_token(models["base"])
    probe = chunked_engine(models, 64).prepare(job("base", "Keep going"), "probe")
    budget = per * (probe.prompt_tokens + 40 + probe.prompt_tokens + 10)  # "first" plus a small one, not two big
    engine = chunked_engine(models, 64, max_rows=8, kv_cache_bytes=budget)
    first = engine.prepare(job("base", "Keep going", max_tokens=40, min_tokens=40), "first")
    large = engine.prepare(job("base", "Keep going", max_tokens=40, min_tokens=40), "large")
    small = engine.prepare(job("base", "Keep going", max_tokens=10, min_tokens=10), "small")
    assert engine.fits([first, small]) and not engine.fits([first, large])

    async def scenario() -> dict[str, list]:
        scheduler = Scheduler(engine)
        async def consume(rid: str, queue) -> None:
            while not isinstance(event := await queue.get(), End):
                times.setdefault(rid, []).append(event.time)
                reserved.setdefault(rid, engine.snapshot()["kv_reserved_bytes"])
            assert event.error is None, event.error

        times: dict[str, list[float]] = {}  # request -> the times of its deltas
        reserved: dict[str, int] = {}  # request -> KV bytes reserved when its first token was read
        streams = {item.request_id: scheduler.submit(item) for item in (first, large, small)}
        await asyncio.gather(*(consume(rid, q) for rid, q in streams.items()))
        return times, reserved

    times, reserved = asyncio.run(scenario())
    assert times["large"][0] > times["first"][-1]  # admitted once "first" ended, though 7 rows were free
    assert times["small"][0] >= times["large"][0]  # the small one, which fitted, did not overtake the large one
    assert reserved["first"] == engine._need(first) <= budget
    snap = engine.snapshot()
    assert snap["kv_reserved_bytes"] == 0 and snap["kv_total_bytes"] == budget


def test_a_request_over_the_whole_kv_budget_is_refused(models):
    from pipelines.kv_budget import bytes_per_token
    from pipelines.serve_scheduler import Scheduler

    per = bytes_per_token(models["base"])
    engine = chunked_engine(models, 64, kv_cache_bytes=per * 100)
    assert engine.prepare(job("base", "Hi", max_tokens=40), "fits").prompt_tokens + 40 <= 100
    with pytest.raises(ApiError, match=r"needs \d+ bytes of KV cache \(n=2 x \(prompt \d+ \+ max_tokens 60\) "
                                       r"tokens x \d+ bytes per token\), over this replica's KV budget of "
                                       rf"{per * 100} bytes \(kv_cache_bytes\); lower max_tokens to \d+ or less, "
                                       r"or raise kv_cache_bytes") as err:
        engine.prepare(job("base", "Hi", max_tokens=60, n=2), "big")
    assert err.value.status == 400 and err.value.code == "kv_cache_exceeded" and err.value.param == "max_tokens"
    # one that got past prepare (a config changed meanwhile) ends with the same error instead of waiting forever
    item = chunked_engine(models, 64).prepare(job("base", "Hi", max_tokens=60, n=2), "late")

    async def scenario() -> End:
        queue = Scheduler(engine).submit(item)
        return await queue.get()

    end = asyncio.run(scenario())
    assert isinstance(end, End) and end.error is not None and "kv_cache_bytes" in end.error.message
    with pytest.raises(ValueError, match="max_step_tokens=4 is below max_rows=8"):
        chunked_engine(models, 4, max_rows=8)
