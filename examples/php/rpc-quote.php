<?php
// An RPC worker (config/worker.yaml, queue `quotes`): prices a basket and
// answers the caller through the reply socket, with a status and a JSON
// body. Publish with reply_to and correlation_id set; the reply carries the
// same correlation_id and the status in the `x-execd-status` header.
//   {"items": [{"sku": "a", "price": 2.5, "qty": 2}]}  ->  200 {"total": 5, ...}
require_once __DIR__ . '/../../clients/php/execd.php';

$basket = json_decode(stream_get_contents(STDIN), true);
if (!is_array($basket) || !is_array($basket['items'] ?? null)) {
    execd_reply(422, ['Content-Type' => 'application/json'], json_encode(['error' => 'expected {"items": [...]}']));
    exit(0);
}
$total = 0.0;
foreach ($basket['items'] as $item) {
    $total += (float) ($item['price'] ?? 0) * (int) ($item['qty'] ?? 1);
}
execd_reply(200, ['Content-Type' => 'application/json', 'X-Priced-By' => 'rpc-quote.php'], json_encode([
    'total' => round($total, 2),
    'items' => count($basket['items']),
    'request_id' => getenv('EXECD_REQUEST_ID'),
]));
