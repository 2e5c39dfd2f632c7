<?php
// GET /hello?name=... — argv[1] is the name, one argument whatever it holds.
$name = $argv[1] ?? 'world';
echo json_encode([
    'hello' => $name,
    'php' => PHP_VERSION,
    'host' => gethostname(),
]), "\n";
