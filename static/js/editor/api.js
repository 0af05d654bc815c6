// JSON requests to the editor's endpoints, with Django's CSRF token on every change.

export function csrfToken() {
  // base.html puts the token on <body hx-headers> for htmx; the cookie is the fallback.
  try {
    const headers = JSON.parse(document.body.getAttribute('hx-headers') || '{}');
    if (headers['X-CSRFToken']) return headers['X-CSRFToken'];
  } catch (error) {
    // fall through to the cookie
  }
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : '';
}

// Returns {ok, status, data}; `data` is the parsed JSON body (or {error} when there is none).
export async function request(url, { method = 'GET', json, form } = {}) {
  const headers = { Accept: 'application/json' };
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  if (method !== 'GET') headers['X-CSRFToken'] = csrfToken();
  const response = await fetch(url, { method, headers, body, credentials: 'same-origin' });
  let data;
  try {
    data = await response.json();
  } catch (error) {
    data = { error: `${response.status} ${response.statusText}` };
  }
  return { ok: response.ok, status: response.status, data };
}
