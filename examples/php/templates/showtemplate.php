<?php
// Prints one template; exit code 3 when it does not exist (the route maps
// 3 to 404).
$dir = getenv('TEMPLATE_DIR') ?: (getenv('HOME') . '/templates-data');
$name = $argv[1] ?? '';
if (!preg_match('/^[A-Za-z0-9_-]{1,64}$/', $name) || !is_file("$dir/$name.json")) {
    echo json_encode(['error' => "no template named $name"]), "\n";
    exit(3);
}
readfile("$dir/$name.json");
echo "\n";
