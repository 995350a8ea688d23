/* remarket.js: the storefront snippet of remarket, served at /rm/remarket.js.
 * remarket('identify'|'cart'|'view', {...}), remarket('captureEmail', '#email',
 * {consent: '#consent' or true, name: '#name'}), remarket('config', {endpoint,
 * onsite, onsiteLink, swScope}), remarket('pushPrompt') (after an add-to-cart,
 * never on page load: asks for notifications, see README "Web push"). Never throws into the page, never blocks it; server
 * and cookie data reach the DOM only as textContent or a checked link. */
(function (w, d) {
	'use strict';
	var prev = w.remarket;
	if (prev && prev.loaded) return;
	var cfg = {endpoint: '/rm', onsite: true, onsiteLink: 'View your cart', swScope: '/'};
	var ID = /^[A-Za-z0-9._:-]{1,64}$/, EMAIL = /^[^\s@<>()\[\],;:"]+@[^\s@<>()\[\],;:"]+\.[A-Za-z]{2,}$/;
	var vidMem, captures = [], sent = {};
	function guard(f) {
		return function () { try { return f.apply(null, arguments); } catch (e) { /* never into the page */ } };
	}
	function str(v, max) { return typeof v === 'string' ? v.replace(/^\s+|\s+$/g, '').slice(0, max) : ''; }
	function has(o, k) { return Object.prototype.hasOwnProperty.call(o, k); }

	/* visitor id: cookie rm_vid, 'v' + 22 random url-safe characters */
	function vid() {
		var m = /(?:^|;\s*)rm_vid=([^;]*)/.exec(d.cookie || ''), v = m && m[1];
		if (!v || !ID.test(v)) {
			if (!vidMem) {
				var abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.';
				var r = new Uint8Array(22);
				w.crypto.getRandomValues(r);
				vidMem = 'v';
				for (var i = 0; i < 22; i++) vidMem += abc.charAt(r[i] & 63);
			}
			v = vidMem;
		}
		return (vidMem = v);
	}

	function send(ev) {
		ev.visitor_id = vid();
		var body = JSON.stringify(ev), url = cfg.endpoint + '/collect', n = w.navigator;
		try {
			if (n.sendBeacon && n.sendBeacon(url, new Blob([body], {type: 'text/plain'}))) return;
		} catch (e) { /* fall back to fetch */ }
		if (w.fetch) w.fetch(url, {method: 'POST', keepalive: true, credentials: 'same-origin',
			headers: {'Content-Type': 'text/plain'}, body: body})['catch'](function () {});
	}
	function emit(type, o, keys) {
		if (!o || typeof o !== 'object') return;
		var ev = {type: type};
		for (var i = 0; i < keys.length; i++) if (o[keys[i]] != null) ev[keys[i]] = o[keys[i]];
		if (type === 'identify') {
			ev.email = str(o.email, 254);
			if (!EMAIL.test(ev.email)) return;
			if (has(ev, 'name')) ev.name = str(ev.name, 100);
			if (has(ev, 'consent')) ev.consent = ev.consent === true;
		}
		send(ev);
	}
	var cmds = {
		config: function (o) {
			if (!o || typeof o !== 'object') return;
			for (var k in o) if (has(o, k)) cfg[k] = o[k];
			cfg.endpoint = String(cfg.endpoint).replace(/\/+$/, '');
		},
		identify: function (o) { emit('identify', o, ['name', 'consent']); },
		cart: function (o) { emit('cart', o, ['cart_id', 'currency', 'items', 'total', 'email']); },
		view: function (o) { emit('view', o, ['sku', 'url']); },
		pushPrompt: function () { pushPrompt(); },
		captureEmail: function (sel, opts) {
			if (!sel) return;
			if (!captures.length) {
				d.addEventListener('change', onField, true);
				d.addEventListener('blur', onField, true);
				w.addEventListener('pagehide', guard(function () { each(capture); }));
			}
			captures.push({sel: sel, o: opts || {}});
		}
	};

	/* captureEmail: delegated listeners, so the fields may appear later */
	function each(f) { for (var i = 0; i < captures.length; i++) f(captures[i]); }
	function find(sel) { return typeof sel === 'string' ? d.querySelector(sel) : sel; }
	function is(el, sel) {
		return !!sel && sel !== true && el && el.nodeType === 1 &&
			(typeof sel === 'string' ? el.matches && el.matches(sel) : el === sel);
	}
	function capture(c) {
		var el = find(c.sel), o = c.o, ev = {email: el ? str(el.value, 254) : ''}, x;
		if (!EMAIL.test(ev.email)) return;
		if (o.consent === true) ev.consent = true;
		else if (o.consent && (x = find(o.consent))) ev.consent = !!x.checked;
		if (o.name && (x = find(o.name)) && str(x.value, 100)) ev.name = str(x.value, 100);
		var key = [ev.email.toLowerCase(), ev.consent, ev.name].join('|');
		if (sent[key]) return; /* once per distinct value */
		sent[key] = 1;
		cmds.identify(ev);
	}
	var onField = guard(function (e) {
		each(function (c) {
			if (is(e.target, c.sel) || is(e.target, c.o.consent) || is(e.target, c.o.name)) capture(c);
		});
	});

	/* web push: the store calls pushPrompt after an add-to-cart (a user
	 * gesture, never on page load); the browser asks once, remarket's
	 * service worker (/rm/sw.js, scope '/') subscribes with the store's
	 * VAPID key (GET /rm/push/key), and the subscription is posted to
	 * /rm/push/subscribe with the rm_vid cookie, which says who it is */
	function b64key(s) {
		var b = w.atob(s.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((s.length + 3) % 4)), a = new Uint8Array(b.length);
		for (var i = 0; i < b.length; i++) a[i] = b.charCodeAt(i);
		return a;
	}
	function pushPrompt() {
		var n = w.navigator, N = w.Notification;
		if (!n.serviceWorker || !w.PushManager || !N || N.permission === 'denied' || !w.fetch) return;
		var opts = {credentials: 'include'}, reg;
		n.serviceWorker.register(cfg.endpoint + '/sw.js', {scope: cfg.swScope}).then(function (r) {
			reg = r;
			return N.permission === 'granted' ? 'granted' : N.requestPermission();
		}).then(function (p) {
			if (p !== 'granted') throw 0;
			return w.fetch(cfg.endpoint + '/push/key', opts);
		}).then(function (r) { return r.json(); }).then(function (k) {
			return n.serviceWorker.ready.then(function () {
				return reg.pushManager.subscribe({userVisibleOnly: true, applicationServerKey: b64key(String(k.key))});
			});
		}).then(function (sub) {
			return w.fetch(cfg.endpoint + '/push/subscribe', {method: 'POST', credentials: 'include',
				headers: {'Content-Type': 'application/json'}, body: JSON.stringify(sub)});
		})['catch'](function () { /* refused or unsupported: nothing to do */ });
	}

	/* on-site message: a returning visitor whose cart was abandoned */
	function store(k, v) {
		try { return v ? w.sessionStorage.setItem(k, v) : w.sessionStorage.getItem(k); } catch (e) { return null; }
	}
	function el(tag, css, text) {
		var e = d.createElement(tag);
		e.style.cssText = css;
		if (text) e.textContent = text;
		return e;
	}
	function banner(data) {
		var url = data && /^(https?:\/\/|\/(?!\/))/i.test(data.cart_url) ? data.cart_url : null;
		if (!data || typeof data.message !== 'string') return;
		if (url) { /* not on the very page the banner leads to */
			var a = d.createElement('a'), p = function (s) { return s.replace(/(\/index)?\.html$/, ''); };
			a.href = url;
			if (a.host === w.location.host && p(a.pathname) === p(w.location.pathname)) return;
		}
		var box = el('div', 'position:fixed;left:16px;right:16px;bottom:16px;max-width:440px;margin:0 auto;' +
			'z-index:2147483000;box-sizing:border-box;padding:14px 48px 14px 18px;background:#2b2622;' +
			'color:#fff;border-radius:10px;box-shadow:0 6px 24px rgba(0,0,0,.25);font:15px/1.45 system-ui,sans-serif');
		box.className = 'rm-onsite';
		box.setAttribute('role', 'status');
		box.appendChild(el('span', '', data.message.slice(0, 200)));
		if (url) {
			var link = el('a', 'color:#f3c98b;font-weight:600;margin-left:10px', String(cfg.onsiteLink));
			link.href = url;
			box.appendChild(link);
		}
		var x = el('button', 'position:absolute;top:6px;right:8px;width:34px;height:34px;border:0;' +
			'background:none;color:#fff;font-size:22px;cursor:pointer', '\u00d7');
		x.type = 'button';
		x.setAttribute('aria-label', 'Dismiss');
		x.onclick = guard(function () { box.parentNode.removeChild(box); });
		box.appendChild(x);
		d.body.appendChild(box);
		store('rm_onsite', '1');
	}
	function onsite() {
		if (!cfg.onsite || store('rm_onsite')) return;
		var r = new XMLHttpRequest();
		r.open('GET', cfg.endpoint + '/onsite'); /* the rm_vid cookie says who */
		r.withCredentials = true;
		r.onload = guard(function () {
			if (r.status !== 200) return;
			var data = JSON.parse(r.responseText), show = guard(function () { banner(data); });
			if (d.body) show();
			else d.addEventListener('DOMContentLoaded', show);
		});
		r.send();
	}

	/* the public function; then the calls queued before the script loaded */
	var api = function (cmd) {
		if (typeof cmd === 'string' && has(cmds, cmd))
			guard(cmds[cmd]).apply(null, Array.prototype.slice.call(arguments, 1));
	};
	api.loaded = true;
	var q = (prev && prev.q) || [];
	w.remarket = api;
	for (var i = 0; i < q.length; i++) guard(function (args) { api.apply(null, args); })(q[i]);
	guard(function () {
		d.cookie = 'rm_vid=' + vid() + '; Path=/; Max-Age=31536000; SameSite=Lax' +
			(w.location.protocol === 'https:' ? '; Secure' : '');
		onsite();
	})();
})(window, document);
