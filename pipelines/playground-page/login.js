// The 401 page: keep the API key the user types in this browser, then load the playground again.
"use strict";
(() => {
  const root = document.body.dataset.root;
  if (document.body.dataset.rejected === "true") document.getElementById("login-error").hidden = false;
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = document.getElementById("login-key").value.trim();
    if (!key) return;
    localStorage.setItem("crosslayer_api_key:" + (root || "/"), key);  // sent as Bearer by playground.js
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `crosslayer_api_key=${encodeURIComponent(key)}; Path=${root || "/"}; SameSite=Strict; ` +
      `Max-Age=2592000${secure}`;  // 30 days; only the page's own routes read it
    location.reload();
  });
})();
