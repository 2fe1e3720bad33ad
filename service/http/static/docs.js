// Swagger UI on this server's document (/openapi.json), from the package's own copy of Swagger UI. With a
// token configured the document needs it too: the page asks for it and keeps it in memory only, adding it to
// the document's request and to every "Try it out".
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let token = null;

  function withToken(request) {
    if (token) request.headers.Authorization = `Bearer ${token}`;
    return request;
  }

  async function start() {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    let response;
    try {
      response = await fetch("openapi.json", { headers, cache: "no-store", credentials: "omit" });
    } catch (_) {
      return fail("Could not reach the server.");
    }
    if (response.status === 401) {
      const refused = token !== null;
      token = null;
      $("token-note").textContent = refused
        ? "That token was refused. Enter the right one: it is kept in this page's memory only."
        : "This server needs a token to show its API. It is kept in this page's memory only.";
      $("token-form").hidden = false;
      $("token").focus();
      return;
    }
    if (!response.ok) return fail(`The server answered ${response.status} for its API document.`);
    $("error").hidden = true;
    window.ui = SwaggerUIBundle({
      url: new URL("openapi.json", window.location.href).href,
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null, // Swagger UI's default sends the document to an outside validator
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
      defaultModelsExpandDepth: 0,
      displayRequestDuration: true,
      requestInterceptor: withToken,
    });
  }

  function fail(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim() || null;
    $("token").value = "";
    $("token-form").hidden = true;
    start();
  });

  start();
})();
