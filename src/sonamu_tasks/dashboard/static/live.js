// Live refresh: re-fetch this page's content (X-Partial: 1 asks for it without the frame) while the page says
// it may change. A run's page marks a finished run with data-finished, and the refresh stops there; what
// only an unfinished run offers (the message form, outside the refreshed part so that typing survives a
// refresh) is removed then.
(() => {
  const live = document.getElementById("live");
  const every = Number(live && live.dataset.refreshMs);
  if (!every || live.querySelector("[data-finished]")) return;
  const finished = () => {
    if (!live.querySelector("[data-finished]")) return false;
    document.querySelectorAll("[data-unfinished-only]").forEach((element) => element.remove());
    return true;
  };
  // The next fetch is planned once the previous one has answered, never on a fixed clock: a slow answer (a
  // busy database) must not pile up requests behind it, each one slowing the others further.
  const refresh = async () => {
    try {
      const response = await fetch(location.href, {headers: {"X-Partial": "1"}});
      if (response.ok) {
        live.innerHTML = await response.text();
        if (finished()) return;
      }
    } catch (error) {
      // The dashboard restarting, the network gone: try again at the next tick.
    }
    setTimeout(refresh, every);
  };
  setTimeout(refresh, every);
})();
