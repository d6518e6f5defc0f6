// caiforge view: refresh the counts while a run goes. The pages work without this script.
"use strict";
(function () {
  const counts = document.getElementById("counts");
  if (!counts) return;
  async function refresh() {
    try {
      const reply = await fetch("/api/live", { cache: "no-store" });
      if (!reply.ok) return;
      const live = await reply.json();
      const parts = Object.keys(live.counts).sort().map((k) => k + " " + live.counts[k]);
      counts.textContent = (parts.join(", ") || "no prompts yet") + (live.running ? " (running)" : "");
      counts.dataset.refreshed = String(Date.now());
      if (live.running) setTimeout(refresh, 2000);
    } catch (e) {
      setTimeout(refresh, 5000);
    }
  }
  refresh();
})();
