<?php
// Stores a template. The request body arrives as the first argument
// ($body in the route's cmd): {"name": "welcome", "text": "Hello {{user}}"}.
$dir = getenv('TEMPLATE_DIR') ?: (getenv('HOME') . '/templates-data');
$raw = $argv[1] ?? '';
$t = json_decode($raw, true);
if (!is_array($t) || !isset($t['name'], $t['text']) || !is_string($t['name'])) {
    fwrite(STDERR, "addtemplate: body is not {\"name\", \"text\"}\n");
    echo json_encode(['error' => 'expected {"name": "...", "text": "..."}']), "\n";
    exit(2);
}
if (!preg_match('/^[A-Za-z0-9_-]{1,64}$/', $t['name'])) {
    echo json_encode(['error' => 'name may hold letters, digits, - and _ only']), "\n";
    exit(2);
}
if (!is_dir($dir) && !mkdir($dir, 0700, true)) {
    fwrite(STDERR, "addtemplate: cannot create $dir\n");
    exit(1);
}
file_put_contents("$dir/{$t['name']}.json", json_encode($t));
echo json_encode(['created' => $t['name']]), "\n";
