<?php
// Lists the stored templates as JSON: {"templates": [{"name": ..., "size": ...}]}.
// Templates live in $TEMPLATE_DIR (set by the route's env), one file each.
$dir = getenv('TEMPLATE_DIR') ?: (getenv('HOME') . '/templates-data');
$out = [];
if (is_dir($dir)) {
    foreach (scandir($dir) as $f) {
        if (substr($f, -5) === '.json') {
            $out[] = ['name' => substr($f, 0, -5), 'size' => filesize("$dir/$f")];
        }
    }
}
echo json_encode(['templates' => $out, 'home' => getenv('HOME')]), "\n";
