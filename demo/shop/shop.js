/*
 * shop.js: the demo shop's own code (not part of remarket). The cart lives
 * in localStorage and is mirrored to the shop backend (POST /api/cart),
 * which tells remarket about it with a signed server event. The remarket
 * snippet (/rm/remarket.js) only identifies the shopper and shows the
 * on-site message; the shop works the same when remarket is down.
 */
(function () {
  'use strict';
  var KEY = 'shop_cart';
  var chain = Promise.resolve();
  var pending = 0;

  function empty() { return { cart_id: null, currency: 'EUR', items: [] }; }

  function load() {
    try {
      var c = JSON.parse(localStorage.getItem(KEY));
      if (c && Array.isArray(c.items)) return c;
    } catch (e) { /* a broken entry is an empty cart */ }
    return empty();
  }

  function save(c) {
    try { localStorage.setItem(KEY, JSON.stringify(c)); } catch (e) { /* private mode */ }
    badge();
  }

  function count(c) {
    return (c || load()).items.reduce(function (n, it) { return n + (it.qty || 1); }, 0);
  }

  function total(c) {
    var t = (c || load()).items.reduce(function (s, it) { return s + it.price * (it.qty || 1); }, 0);
    return Math.round(t * 100) / 100;
  }

  function badge() {
    var n = count();
    document.querySelectorAll('[data-cart-count]').forEach(function (el) {
      el.textContent = String(n);
      el.hidden = n === 0;
    });
  }

  function money(n, cur) {
    try {
      return new Intl.NumberFormat('en-IE', { style: 'currency', currency: cur || 'EUR' }).format(n);
    } catch (e) {
      return (cur || 'EUR') + ' ' + Number(n).toFixed(2);
    }
  }

  function abs(path) { return new URL(path, location.href).href; }

  function busy(on) { document.documentElement.setAttribute('data-sync', on ? 'busy' : 'idle'); }

  // Sends the current cart to the backend, one request at a time, so the
  // cart_id the first answer creates is used by every later one.
  function sync() {
    pending++;
    busy(true);
    chain = chain.then(function () {
      var c = load();
      if (!c.cart_id && !c.items.length) return null;
      return fetch('/api/cart', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ cart_id: c.cart_id, currency: c.currency, items: c.items, total: total(c) })
      }).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
        if (j && j.cart_id) {
          var now = load();
          now.cart_id = j.cart_id;
          save(now);
        }
      });
    }).catch(function () { /* the shop keeps working offline */ }).then(function () {
      if (--pending === 0) busy(false);
    });
    return chain;
  }

  function add(p) {
    var c = load();
    var it = c.items.filter(function (x) { return x.sku === p.sku; })[0];
    if (it) it.qty = Math.min((it.qty || 1) + 1, 99);
    else c.items.push({ sku: p.sku, name: p.name, price: Number(p.price), qty: 1,
      url: abs(p.url), image: abs(p.image) });
    save(c);
    toast(p.name + ' added to your cart');
    return sync();
  }

  function remove(sku) {
    var c = load();
    c.items = c.items.filter(function (x) { return x.sku !== sku; });
    save(c);
    return sync();
  }

  function clear() { save(empty()); }

  var toastTimer;
  function toast(text) {
    var el = document.getElementById('toast');
    if (!el) return;
    el.textContent = text;
    el.classList.add('show');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.classList.remove('show'); }, 1800);
  }

  busy(false);
  window.shop = { load: load, save: save, add: add, remove: remove, clear: clear, sync: sync,
    count: count, total: total, money: money, toast: toast, badge: badge };
  document.addEventListener('DOMContentLoaded', badge);
})();
