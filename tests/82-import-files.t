#!/usr/bin/perl
# 82-import-files.t: `remarket import` with the files people have (issue
# 11): Excel's "CSV UTF-8" (a byte order mark, ';' and CRLF), a
# tab-separated export, dates with an offset, a file without its header
# (exit 1, nothing imported), a header lacking a required column (named),
# a stray quote (its line named, the rest imported), --dry-run (the counts
# and refusals, nothing written), and refusals that speak of CSV columns
# and line numbers, not of JSON paths.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
plan skip_all => 'sqlite3 not installed' unless grep { -x "$_/sqlite3" } split /:/, $ENV{PATH};
my $tmp = tempdir(CLEANUP => 1);
my %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null');
my $T0 = 1795000000;

sub rm {
	my @args = @_;
	local %ENV = (%ENV, %env);
	delete local $ENV{GATEWAY_INTERFACE};
	my $q = join ' ', map { "'$_'" } @args;
	my $out = `'$bin' $q < /dev/null 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub file {
	my ($name, $bytes) = @_;
	open my $fh, '>:raw', "$tmp/$name" or die;
	print $fh $bytes;
	close $fh;
	return "$tmp/$name";
}
sub sql {
	my $q = shift;
	my $o = `sqlite3 -batch '$tmp/rm.db' "$q"`;
	chomp $o;
	return $o;
}

is((rm('init'))[0], 0, 'init');

# Excel's "CSV UTF-8" in a locale with a decimal comma: BOM, ';', CRLF
my $excel = file('excel.csv', "\xEF\xBB\xBFInvoiceNo;StockCode;Description;"
	. "Quantity;InvoiceDate;UnitPrice;CustomerID;email\r\n"
	. "536365;LAMP;\"Lamp; rattan\";2;2026-06-20T10:00:00+02:00;39.9;17850;ann\@example.com\r\n"
	. "536366;CUP;Cup;x;2026-06-20T11:00:00+02:00;5;17850;ann\@example.com\r\n");
my ($rc, $out, $err) = rm('import', 'orders', $excel, '--now', $T0);
is($rc, 1, "Excel's CSV UTF-8 with ';': read, one refused line makes exit 1") or diag $err;
is($out, qq({"imported":1,"refused":1}\n), '... one order in, one refused');
like($err, qr/^remarket import: \Q$excel\E line 3: Quantity: must be an integer \(order 536366\)$/m,
	'... the refusal names the file, the line and the column as the header spells it');
unlike($err, qr/items\[|\$\./, '... and no JSON path');
is(sql("SELECT ts FROM orders WHERE order_key = '536365'"), 1781942400,
	'... 10:00:00+02:00 is 08:00:00Z');
is(sql("SELECT value ->> 'name' FROM orders, json_each(items) WHERE order_key = '536365'"),
	'Lamp; rattan', "... a quoted ';' is text");

# tab-separated
my $tab = file('tab.tsv', "order_id\temail\tdate\tsku\tname\tprice\tqty\n"
	. "t1\tbob\@example.com\t2026-06-21\tVASE\tVase, blue\t12\t1\n");
($rc, $out, $err) = rm('import', 'orders', $tab, '--now', $T0);
is($rc, 0, 'tab-separated: exit 0') or diag $err;
is(sql("SELECT count(*) FROM orders WHERE order_key = 't1'"), 1, '... imported');

# a file without its header: exit 1, nothing imported
my $nohdr = file('nohdr.csv', "n1,cy\@example.com,2026-06-21,VASE,Vase,12,1\n");
($rc, $out, $err) = rm('import', 'orders', $nohdr, '--now', $T0);
is($rc, 1, 'a file without its header: exit 1, not 0');
like($err, qr/\Q$nohdr\E: line 1 names none of the columns: a file without its header line\?/,
	'... said');
like($err, qr/the first line must name the columns, separated by ',', ';' or tabs: order_id,email,date,sku/,
	'... with the columns it must name');
is(sql("SELECT count(*) FROM orders WHERE order_key = 'n1'"), 0, '... nothing imported');
($rc, $out, $err) = rm('import', 'products', $nohdr);
is($rc, 1, 'products without a header: exit 1');

# a header lacking a required column
my $miss = file('miss.csv', "order_id,email,date,name,price,qty\nm1,d\@example.com,2026-06-21,Vase,12,1\n");
($rc, $out, $err) = rm('import', 'orders', $miss, '--now', $T0);
is($rc, 1, 'a missing column: exit 1');
like($err, qr/^remarket import: \Q$miss\E: missing column 'sku' \(or its alias 'StockCode'\)$/m,
	'... named, with its alias');

# a stray quote: its line named, the others imported
my $quote = file('quote.csv', "order_id,email,date,sku,name,price,qty\n"
	. "q1,eve\@example.com,2026-06-21,VASE,Vase,12,1\n"
	. "q2,eve\@example.com,2026-06-21,VASE,\"Vase,12,1\n"
	. "q3,eve\@example.com,2026-06-21,LAMP,Lamp,40,1\n"
	. "q4,eve\@example.com,2026-06-21,LAMP,Lamp,40,1\n");
($rc, $out, $err) = rm('import', 'orders', $quote, '--now', $T0);
is($rc, 1, 'a stray quote: exit 1');
is($out, qq({"imported":3,"refused":1}\n), '... the lines after it imported');
like($err, qr/\Q$quote\E line 3: a quote \(\"\) opened on this line is never closed/,
	'... the line where it opened named');

# --dry-run: what would be imported, nothing written
my $dry = file('dry.csv', "order_id,email,date,sku,name,price,qty\n"
	. "d1,fay\@example.com,2026-06-21,VASE,Vase,12,1\n"
	. "d2,gus\@example.com,2026-06-21,VASE,Vase,abc,1\n"
	. "d3,not-an-address,2026-06-21,VASE,Vase,12,1\n");
my $counts = q{SELECT (SELECT count(*) FROM orders) || '/' || (SELECT count(*) FROM contacts) }
	. q{|| '/' || (SELECT count(*) FROM events)};
my $before = sql($counts);
like($before, qr{^\d+/\d+/\d+$}, 'the counts before the dry run');
($rc, $out, $err) = rm('import', 'orders', $dry, '--dry-run', '--now', $T0);
is($rc, 1, '--dry-run: the exit code the import would have');
is($out, qq({"dry_run":true,"would_import":1,"refused":2}\n), '... what would be imported');
like($err, qr/\Q$dry\E line 3: price: must be a number \(order d2\)/, '... each refusal');
like($err, qr/^remarket import: refused: 1 line, 1 order, revenue 12\.00: email: must be an email address/m,
	'... and the summary by reason');
is(sql($counts), $before, '... and nothing written');
($rc, $out) = rm('import', 'orders', $dry, '--now', $T0);
is($out, qq({"imported":1,"refused":2}\n), 'the import itself does what the dry run said');

my $pdry = file('p.csv', "sku;name;price\nP1;Lamp;12\nP2;Vase;x\n");
($rc, $out, $err) = rm('import', 'products', $pdry, '--dry-run');
is($out, qq({"dry_run":true,"would_import":1,"refused":1}\n), 'products --dry-run: the counts');
like($err, qr/\Q$pdry\E line 3: price: must be a number/, '... the refusal, with its line');
is(sql("SELECT count(*) FROM products WHERE sku IN ('P1', 'P2')"), 0, '... nothing written');

# usage
($rc, $out, $err) = rm('import', 'products', $pdry, '--rejects', "$tmp/r.csv");
is($rc, 2, '--rejects is for orders: exit 2');
($rc, $out, $err) = rm('import', 'orders', $dry, '--dryrun');
is($rc, 2, 'an unknown option: exit 2');
like($err, qr/unknown option '--dryrun'/, '... named');

done_testing;
