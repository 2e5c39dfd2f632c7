<?php
/**
 * execd reply-socket client: answer an HTTP request or an AMQP RPC call with
 * a status, headers and a binary-safe body, instead of printing to stdout.
 *
 *     require_once '/path/to/clients/php/execd.php';
 *     execd_reply(200, ['Content-Type' => 'application/json'], json_encode($result));
 *
 * The route or consumer must have `reply-socket: true`; execd then passes the
 * socket path in EXECD_REPLY_SOCKET. One reply per run; execd answers "OK" or
 * "ERR <reason>", and anything but OK throws ExecdReplyException with that
 * reason (an oversized body, a bad header), so a script can log it and exit
 * non-zero. A single file with no dependencies: require it, or install it with
 * composer (`execd/reply-client`, autoloaded as a file).
 *
 * The framing, for other languages: see docs/amqp.md ("The reply socket").
 */

declare(strict_types=1);

if (!class_exists('ExecdReplyException', false)) {
    /** The reply could not be delivered, or execd refused it. */
    class ExecdReplyException extends RuntimeException
    {
    }
}

if (!function_exists('execd_reply_available')) {
    /** Whether this run was given a reply socket (`reply-socket: true`). */
    function execd_reply_available(): bool
    {
        $path = getenv('EXECD_REPLY_SOCKET');
        return is_string($path) && $path !== '';
    }
}

if (!function_exists('execd_reply')) {
    /**
     * Sends the reply. $headers maps names to values (a list of values repeats
     * the header), or is a list of [name, value] pairs.
     *
     * @param array<string|int, string|int|float|array<int, string>> $headers
     * @throws ExecdReplyException
     */
    function execd_reply(int $status, array $headers = [], string $body = ''): void
    {
        $path = getenv('EXECD_REPLY_SOCKET');
        if (!is_string($path) || $path === '') {
            throw new ExecdReplyException('EXECD_REPLY_SOCKET is not set: enable `reply-socket: true` on the route or consumer');
        }
        if ($status < 200 || $status > 599) {
            throw new ExecdReplyException("status $status is not between 200 and 599");
        }
        $frame = 'EXECD-REPLY/1 ' . $status . ' ' . strlen($body) . "\n";
        foreach ($headers as $name => $value) {
            if (is_int($name) && is_array($value) && count($value) === 2) {
                [$name, $value] = array_values($value);
            }
            foreach ((array) $value as $v) {
                $name = (string) $name;
                $v = (string) $v;
                if ($name === '' || preg_match('/[\x00-\x20\x7f:]/', $name)) {
                    throw new ExecdReplyException("bad header name " . json_encode($name));
                }
                if (preg_match('/[\x00-\x08\x0a-\x1f\x7f]/', $v)) {
                    throw new ExecdReplyException("header $name holds a control character");
                }
                $frame .= $name . ': ' . $v . "\n";
            }
        }
        $frame .= "\n" . $body;

        $sock = @stream_socket_client('unix://' . $path, $errno, $errstr, 5.0);
        if ($sock === false) {
            throw new ExecdReplyException("cannot connect to the reply socket $path: $errstr (a run may reply once)");
        }
        stream_set_timeout($sock, 60);
        $length = strlen($frame);
        for ($sent = 0; $sent < $length; $sent += $n) {
            $n = @fwrite($sock, substr($frame, $sent, 1 << 16));
            if ($n === false || $n === 0) {
                // execd stops reading at the first problem and says why.
                break;
            }
        }
        $answer = fgets($sock);
        fclose($sock);
        if ($answer === false) {
            throw new ExecdReplyException('execd closed the reply socket without confirming the reply');
        }
        $answer = rtrim($answer, "\r\n");
        if ($answer !== 'OK') {
            throw new ExecdReplyException('execd refused the reply: ' . (str_starts_with($answer, 'ERR ') ? substr($answer, 4) : $answer));
        }
    }
}
