/* sw.js: remarket's service worker, served at /rm/sw.js with
 * Service-Worker-Allowed: / so the store may register it with scope '/'
 * (remarket('pushPrompt') does). It shows remarket's notifications (the
 * payload is JSON {title, body, url, icon}, decrypted by the browser) and
 * opens the notification's link on a click: a link to the store's own
 * origin, or to remarket's signed links there. */
'use strict';
self.addEventListener('install', function () { self.skipWaiting(); });
self.addEventListener('activate', function (e) { e.waitUntil(self.clients.claim()); });

function text(v, max) { return typeof v === 'string' ? v.slice(0, max) : ''; }

self.addEventListener('push', function (e) {
	var data = {};
	try { data = e.data ? e.data.json() : {}; } catch (err) { data = {}; }
	var title = text(data.title, 120) || self.location.hostname;
	var opts = {body: text(data.body, 400), data: {url: text(data.url, 2000)}};
	if (/^https:\/\//i.test(data.icon || '')) opts.icon = data.icon;
	e.waitUntil(self.registration.showNotification(title, opts));
});

self.addEventListener('notificationclick', function (e) {
	e.notification.close();
	var url = e.notification.data && e.notification.data.url;
	if (!/^https?:\/\//i.test(url || '')) url = self.registration.scope;
	e.waitUntil(self.clients.openWindow(url));
});
