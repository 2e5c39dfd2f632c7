<?php
// Sleeps for ?seconds= (default 60): shows timeouts and draining.
$s = (float)($argv[1] ?? 60);
usleep((int)($s * 1e6));
echo "slept $s\n";
