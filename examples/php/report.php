<?php
// An HTTP route answering through the reply socket (config/worker.yaml,
// GET /report?month=2024-05): a CSV download with its own status and
// headers, however much the script printed on the way.
require_once __DIR__ . '/../../clients/php/execd.php';

$month = $argv[1] ?? '';
if (!preg_match('/^\d{4}-\d{2}$/', $month)) {
    execd_reply(400, ['Content-Type' => 'application/json'], json_encode(['error' => 'month must look like 2024-05']));
    exit(0);
}
echo "legacy debug output that used to break the response\n";
$csv = "day,orders\n";
$days = (int) date('t', strtotime("$month-01"));
for ($d = 1; $d <= $days; $d++) {
    $csv .= sprintf("%s-%02d,%d\n", $month, $d, crc32("$month-$d") % 50);
}
execd_reply(200, [
    'Content-Type' => 'text/csv; charset=utf-8',
    'Content-Disposition' => "attachment; filename=\"orders-$month.csv\"",
], $csv);
