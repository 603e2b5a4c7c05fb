// vncdispatch's desktop viewer over noVNC's RFB library.
//
// Options come from the page's query string (or its #fragment, which is never sent to a
// server), named as noVNC's own vnc.html names them so a portal's links keep working:
//   path             WebSocket path on this server, e.g. `websockify?token=…` (default `websockify`)
//   password         the desktop's VNC password; removed from the address bar once read
//   reconnect        `true`: reconnect after a dropped connection (default false)
//   reconnect_delay  milliseconds before reconnecting (default 5000, at least 500; doubled
//                    up to 30 s while reconnecting fails)
//   resize           `remote` (default: the desktop follows the window), `scale` or `off`
//   view_only        `true`: send no keyboard or mouse input
//   shared           `false`: ask the server to drop other viewers (default true)
//   quality, compression  0–9, passed to noVNC
// `autoconnect` is accepted and implied: the page always connects. `host`, `port` and
// `encrypt` are ignored on purpose: the page connects only to the server that served it,
// over wss when it came over https, so a crafted link cannot send a user's keystrokes to
// another server. (A link can still carry another user's token — the status line names the
// desktop it shows, so a user can tell it is not theirs.)
import RFB from '../core/rfb.js';

const root = document.documentElement;
const $ = (id) => document.getElementById(id);

function options() {
  const query = new URLSearchParams(location.search);
  const hash = new URLSearchParams(location.hash.slice(1));
  const get = (name, dflt) => hash.get(name) ?? query.get(name) ?? dflt;
  const flag = (name, dflt) => {
    const v = get(name, null);
    return v === null ? dflt : ['1', 'true', 'yes', 'on'].includes(v.toLowerCase());
  };
  const level = (name) => {
    const n = Number.parseInt(get(name, ''), 10);
    return Number.isInteger(n) && n >= 0 && n <= 9 ? n : null;
  };
  const password = get('password', null);
  if (password !== null) {
    // Out of the address bar, the history and any bookmark; kept here for reconnects. Every
    // parameter whose decoded name is `password` goes (`pass%77ord` too); the rest of the
    // link stays as the portal wrote it.
    const strip = (part, lead) => {
      const kept = part.slice(1).split('&').filter((kv) => {
        try {
          return decodeURIComponent(kv.split('=')[0].replace(/\+/g, ' ')) !== 'password';
        } catch {
          return true;
        }
      });
      const rest = kept.filter((kv) => kv !== '').join('&');
      return rest ? lead + rest : '';
    };
    history.replaceState(null, '', location.pathname + strip(location.search, '?') + strip(location.hash, '#'));
  }
  // At least half a second between tries, doubling (to 30 s) while they fail.
  const given = Number.parseInt(get('reconnect_delay', '5000'), 10);
  const delay = Number.isFinite(given) ? Math.max(500, given) : 5000;
  return {
    path: get('path', 'websockify'),
    password,
    reconnect: flag('reconnect', false),
    reconnectDelay: delay,
    resize: get('resize', 'remote'),
    viewOnly: flag('view_only', false),
    shared: flag('shared', true),
    quality: level('quality'),
    compression: level('compression'),
  };
}

// The WebSocket URL for `path`, on this page's own server only.
function socketUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const base = `${scheme}//${location.host}/`;
  const url = new URL(path.replace(/^\/+/, ''), base);
  if (url.host !== location.host || url.protocol !== scheme) {
    throw new Error('the link names a WebSocket path on another server; refusing it');
  }
  return url.href;
}

function setState(state, text) {
  root.classList.remove('noVNC_connecting', 'noVNC_connected', 'noVNC_disconnected');
  root.classList.add(`noVNC_${state}`);
  $('status').textContent = text;
}

async function showVersion() {
  let version = null;
  try {
    const r = await fetch(new URL('../package.json', import.meta.url), { cache: 'no-store' });
    if (r.ok) version = (await r.json()).version ?? null;
  } catch { /* Debian's noVNC ships no package.json: the version stays unknown. */ }
  root.dataset.novncVersion = version ?? 'unknown';
  $('version').textContent = version ? `noVNC ${version}` : 'noVNC (version unknown)';
}

function start() {
  const opts = options();
  let url;
  try {
    url = socketUrl(opts.path);
  } catch (e) {
    setState('disconnected', `Cannot connect: ${e.message}`);
    return;
  }
  let rfb = null;
  let name = '';
  let wait = opts.reconnectDelay;
  let retry = null;
  let password = opts.password;
  let leaving = false;
  addEventListener('pagehide', () => { leaving = true; });

  const connect = () => {
    clearTimeout(retry);
    retry = null;
    setState('connecting', 'Connecting…');
    const credentials = password === null ? undefined : { password };
    rfb = new RFB($('noVNC_container'), url, { shared: opts.shared, credentials });
    rfb.viewOnly = opts.viewOnly;
    rfb.resizeSession = opts.resize === 'remote';
    rfb.scaleViewport = opts.resize === 'scale';
    if (opts.quality !== null) rfb.qualityLevel = opts.quality;
    if (opts.compression !== null) rfb.compressionLevel = opts.compression;
    rfb.addEventListener('connect', () => {
      wait = opts.reconnectDelay;
      setState('connected', name ? `Connected: ${name}` : 'Connected');
      $('cad').disabled = opts.viewOnly;
      $('login').hidden = true;
      rfb.focus();
    });
    rfb.addEventListener('desktopname', (e) => {
      name = e.detail.name;
      document.title = name;
      if (root.classList.contains('noVNC_connected')) setState('connected', `Connected: ${name}`);
    });
    rfb.addEventListener('credentialsrequired', () => {
      if (password !== null) {
        rfb.sendCredentials({ password });
        return;
      }
      setState('connecting', 'Password needed');
      $('login').hidden = false;
      $('password').focus();
    });
    rfb.addEventListener('securityfailure', (e) => {
      // A wrong password: ask again rather than retrying the same one.
      password = null;
      const why = e.detail.reason ? `: ${e.detail.reason}` : '';
      setState('disconnected', `Login refused${why}`);
    });
    rfb.addEventListener('clipboard', (e) => { $('clipboard_text').value = e.detail.text; });
    const mine = rfb;
    rfb.addEventListener('disconnect', (e) => {
      // Only the current connection's end counts (one replaced by a login is over anyway).
      if (leaving || rfb !== mine) return;
      $('cad').disabled = true;
      const how = e.detail.clean ? 'Disconnected' : 'Connection lost';
      if (opts.reconnect) {
        setState('disconnected', `${how}; reconnecting in ${Math.round(wait / 100) / 10} s…`);
        retry = setTimeout(connect, wait);
        wait = Math.min(wait * 2, 30000);
      } else {
        setState('disconnected', `${how}. Reload the page to connect again.`);
      }
    });
  };

  $('login').addEventListener('submit', (e) => {
    e.preventDefault();
    password = $('password').value;
    $('password').value = '';
    $('login').hidden = true;
    if (rfb && !root.classList.contains('noVNC_disconnected')) {
      rfb.sendCredentials({ password });
    } else {
      connect();
    }
  });
  $('cad').addEventListener('click', () => rfb?.sendCtrlAltDel());
  $('clip').addEventListener('click', () => {
    const panel = $('clipboard');
    panel.hidden = !panel.hidden;
    $('clip').setAttribute('aria-expanded', String(!panel.hidden));
  });
  $('clipboard_text').addEventListener('change', (e) => rfb?.clipboardPasteFrom(e.target.value));
  $('full').addEventListener('click', () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else root.requestFullscreen?.();
  });
  connect();
}

showVersion();
start();
