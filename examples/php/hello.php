<?php
// Greets ${query.name}; shows what a script sees of the request.
$name = $argv[1] ?? 'world';
echo json_encode([
    'greeting' => "Hello, $name!",
    'method' => getenv('REQUEST_METHOD'),
    'query' => getenv('QUERY_STRING'),
    'request_id' => getenv('EXECD_REQUEST_ID'),
]), "\n";
