<?php
// A legacy script that sets its own status and headers, CGI style
// (the route says `output: cgi`).
$id = $_SERVER['argv'][1] ?? '';
if ($id === '') {
    echo "Status: 400 Bad Request\r\n";
    echo "Content-Type: text/plain\r\n\r\n";
    echo "missing id\n";
    exit(0);
}
echo "Status: 201 Created\r\n";
echo "Content-Type: application/json\r\n";
echo "X-Legacy: yes\r\n";
// The id comes from the client: encoded, so a CR or LF in it cannot start
// a header of its own.
echo "Location: /legacy/" . rawurlencode($id) . "\r\n\r\n";
echo json_encode(['id' => $id]), "\n";
