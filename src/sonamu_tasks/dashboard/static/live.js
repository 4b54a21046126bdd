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
  const timer = setInterval(async () => {
    const response = await fetch(location.href, {headers: {"X-Partial": "1"}});
    if (!response.ok) return;
    live.innerHTML = await response.text();
    if (finished()) clearInterval(timer);
  }, every);
})();
