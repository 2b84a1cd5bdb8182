-- name: session_set_timeouts
-- Session-wide (is_local = false): every later transaction on this connection inherits
-- them. A lock wait ends after lock_timeout (55P03), a transaction left idle (its client
-- frozen or gone) is ended by the server after idle_in_transaction_session_timeout
-- (25P03), and the server's keepalives drop a session whose client vanished. On a Unix
-- socket the keepalive settings are accepted and ignored.
SELECT set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, false),
       set_config('tcp_keepalives_idle', %(keepalives_idle)s, false),
       set_config('tcp_keepalives_interval', %(keepalives_interval)s, false),
       set_config('tcp_keepalives_count', %(keepalives_count)s, false);
