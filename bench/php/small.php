<?php
// The "small script" of the PHP scenario: a little of what a real endpoint
// does (read the environment, build an array, encode JSON) and no I/O, so
// the number is PHP's start-up plus a realistic sliver of work.
$items = [];
for ($i = 0; $i < 50; $i++) {
    $items[] = ['id' => $i, 'name' => "item-$i", 'even' => $i % 2 === 0];
}
echo json_encode([
    'method' => getenv('REQUEST_METHOD') ?: 'CLI',
    'count' => count($items),
    'sum' => array_sum(array_column($items, 'id')),
]), "\n";
