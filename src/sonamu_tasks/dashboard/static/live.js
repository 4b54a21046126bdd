// Live refresh: re-fetch this page's content (X-Partial: 1 asks for it without the frame) while the page says
// it may change. A run's page marks a finished run with data-finished, and the refresh stops there.
(() => {
  const live = document.getElementById("live");
  const every = Number(live && live.dataset.refreshMs);
  if (!every || live.querySelector("[data-finished]")) return;
  const timer = setInterval(async () => {
    const response = await fetch(location.href, {headers: {"X-Partial": "1"}});
    if (!response.ok) return;
    live.innerHTML = await response.text();
    if (live.querySelector("[data-finished]")) clearInterval(timer);
  }, every);
})();
