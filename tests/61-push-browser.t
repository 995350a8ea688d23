#!/usr/bin/perl
# 61-push-browser.t: web push in a real Chromium (issue 13). On the demo
# shop's page (one origin with /rm/), remarket('pushPrompt') registers
# remarket's service worker from /rm/sw.js with scope '/' (allowed by its
# Service-Worker-Allowed header); then DevTools'
# ServiceWorker.deliverPushMessage hands it a push message as a push
# service would (after decryption), and the worker shows the notification
# with the title, body and link of the payload. Headless Chromium has no
# push service to subscribe to, so the subscription itself is covered by
# tests/49-push.t; clicking a notification has no DevTools command, so
# the click handler is not driven here.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use File::Temp qw(tempdir);
use JSON::PP ();
use RMTest qw(:DEFAULT bin);
use RMBrowser;

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();
if (my $why = RMBrowser::missing()) {
	plan skip_all => "no browser: $why";
}
my $J = JSON::PP->new->canonical;
my $dir = tempdir('rm-push-b-XXXXXX', TMPDIR => 1, CLEANUP => 1);

start(smtp => 0, env => { RMBrowser::shop_env(),
	REMARKET_VAPID_KEY_FILE => "$dir/vapid.pem",
	REMARKET_VAPID_SUBJECT => 'mailto:shop@example.com' });
my ($rc) = cli('keygen', '--vapid');
is($rc, 0, 'keygen --vapid');
RMBrowser::start_shop();
my $b = RMBrowser::browser();
my $origin = RMBrowser::shop_url();

sub async_js {
	my ($script) = @_;
	return $b->cmd('POST', '/execute/async', { script => $script, args => [] });
}

$b->cdp('Browser.grantPermissions', { origin => $origin, permissions => ['notifications'] });
$b->get('/');
ok($b->wait_until(sub { $b->js('return !!(window.remarket && window.remarket.loaded)') }, 10),
	'the shop page loads remarket.js');
$b->js("remarket('pushPrompt')");
my $reg = $b->wait_until(sub {
	my $v = async_js('var done = arguments[0]; navigator.serviceWorker.getRegistration("/")'
		. '.then(function (r) { done(r && r.active ? r.scope + " " + r.active.scriptURL : ""); },'
		. ' function (e) { done(""); });');
	return $v;
}, 15) // '';
is($reg, "$origin/ $origin/rm/sw.js",
	"pushPrompt registers /rm/sw.js with scope '/'");

# a push message as the push service delivers it to the worker
$b->cdp('ServiceWorker.enable');
my $msg = $J->encode({ title => 'Your cart is waiting', body => 'The lamp is still there.',
	url => "$origin/cart?restore=c1", icon => undef });
my ($delivered, $why) = (0, '');
for my $id (0 .. 4) {  # a fresh profile's first registration is 0
	if (eval { $b->cdp('ServiceWorker.deliverPushMessage',
		{ origin => "$origin/", registrationId => "$id", data => $msg }); 1 }) {
		$delivered = 1;
		last;
	}
	$why = $@;
}
ok($delivered, 'DevTools delivers a push message to the worker') or diag $why;
my $shown = $b->wait_until(sub {
	async_js('var done = arguments[0]; navigator.serviceWorker.getRegistration("/")'
		. '.then(function (r) { return r.getNotifications(); }).then(function (ns) {'
		. ' done(ns.length ? ns[0].title + "|" + ns[0].body + "|" + ns[0].data.url : ""); },'
		. ' function (e) { done(""); });');
}, 10) // '';
is($shown, "Your cart is waiting|The lamp is still there.|$origin/cart?restore=c1",
	'the worker shows the notification: title, body, and the link a click opens');
done_testing();
