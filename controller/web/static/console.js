// Progressive enhancement: a running job's page follows the job without reloading.
// It polls /jobs/ID/state (same origin, the session's cookie) and sets text only
// (textContent, never HTML). Without JavaScript the page refreshes itself instead.
"use strict";
(function () {
  const section = document.getElementById("job");
  if (!section || section.dataset.ended === "true") {
    return;
  }
  const id = section.dataset.job;
  const set = (elementId, text) => {
    const element = document.getElementById(elementId);
    if (element) {
      element.textContent = text;
    }
  };
  async function poll() {
    let state;
    try {
      const reply = await fetch(`/jobs/${encodeURIComponent(id)}/state`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!reply.ok) {
        set("error", `could not follow the job (HTTP ${reply.status}); reload the page`);
        return;
      }
      state = await reply.json();
    } catch (error) {
      setTimeout(poll, 2000);
      return;
    }
    const status = document.getElementById("status");
    status.textContent = state.status;
    status.className = `status ${state.status}`;
    const progress = document.getElementById("progress");
    if (state.bytes_total > 0) {
      progress.max = state.bytes_total;
      progress.value = state.bytes_done;
    }
    set("phase", state.phase || "");
    set("duration", state.duration);
    set("bytes-read", state.bytes_read);
    set("bytes-sent", state.bytes_sent);
    set("bytes-stored", state.bytes_stored);
    set("error", state.error || "-");
    if (state.ended) {
      // The whole record (details, recovery point) once it has ended.
      window.location.reload();
      return;
    }
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 500);
})();
