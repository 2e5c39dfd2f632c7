<?php
// Reads the request body from stdin and answers it upper-cased.
echo strtoupper(stream_get_contents(STDIN));
