<?php
// A queue worker (config/worker.yaml, queue `mail`): one JSON job per
// message on stdin, e.g. {"to": "ada@example.org", "subject": "Welcome"}.
// Exit codes tell execd what to do with the message:
//   0   done: ack
//   2   the job is invalid and never will be valid: dead-letter at once
//   75  a temporary failure (EX_TEMPFAIL): retry later, with backoff
// "Sending" appends a line to $OUTBOX/sent.log; a recipient at
// flaky.example fails temporarily on its first two attempts.
$job = json_decode(stream_get_contents(STDIN), true);
if (!is_array($job) || !filter_var($job['to'] ?? '', FILTER_VALIDATE_EMAIL) || ($job['subject'] ?? '') === '') {
    fwrite(STDERR, "invalid job: need {\"to\": an address, \"subject\": text}\n");
    exit(2);
}
$attempt = (int) (getenv('AMQP_ATTEMPT') ?: 1);
if (str_ends_with($job['to'], '@flaky.example') && $attempt < 3) {
    fwrite(STDERR, "mail server for {$job['to']} unavailable (attempt $attempt)\n");
    exit(75);
}
$outbox = getenv('OUTBOX') ?: sys_get_temp_dir();
@mkdir($outbox, 0700, true);
$line = sprintf("%s\t%s\t%s\tattempt %d\n", date('c'), $job['to'], $job['subject'], $attempt);
file_put_contents("$outbox/sent.log", $line, FILE_APPEND | LOCK_EX);
