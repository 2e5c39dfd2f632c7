<?php
// The queue worker: one message body on stdin per run. Exit 0 acks it; exit 2
// marks it as poison (dead-lettered at once); any other failure is retried on
// the consumer's schedule (config/worker.yaml).
$job = json_decode(stream_get_contents(STDIN), true);
if (!is_array($job) || !isset($job['order_id'])) {
    fwrite(STDERR, "not a job: expected {\"order_id\": ...}\n");
    exit(2);
}
$attempt = (int) (getenv('AMQP_ATTEMPT') ?: 1);
if (!empty($job['fail'])) {
    fwrite(STDERR, "job {$job['order_id']} failed on attempt {$attempt}\n");
    exit(1);
}
usleep(200000); // the work
fwrite(STDERR, "job {$job['order_id']} done on attempt {$attempt}\n");
