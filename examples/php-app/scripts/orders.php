<?php
// POST /orders — a JSON order on stdin. Exit 2 with the reason as JSON on a
// bad order (the route maps 2 -> 422); exit 0 with the accepted order.
// EXECD_VAR_API_KEY_ID names the caller's key (set by the api-key plugin).
$order = json_decode(stream_get_contents(STDIN), true);
$errors = [];
if (!is_array($order)) {
    $errors[] = 'the body must be a JSON object';
} else {
    if (!is_string($order['item'] ?? null) || $order['item'] === '') {
        $errors[] = 'item: a non-empty string';
    }
    if (!is_int($order['qty'] ?? null) || $order['qty'] < 1) {
        $errors[] = 'qty: a positive integer';
    }
}
if ($errors) {
    echo json_encode(['errors' => $errors]), "\n";
    exit(2);
}
echo json_encode([
    'accepted' => $order,
    'id' => bin2hex(random_bytes(8)),
    'by' => getenv('EXECD_VAR_API_KEY_ID') ?: null,
]), "\n";
