-- name: llm_reserve
-- Reserve the longest prefix of a shard's requests the limit allows (migrations/0001).
SELECT granted, granted_tokens, reservation_id, wait_s
FROM pgbatch.llm_reserve(%(name)s, %(rpm)s, %(tpm)s, %(max_in_flight)s, %(shard_id)s,
                         %(epoch)s, %(tokens)s::int[], %(window_s)s,
                         %(settle_ids)s::bigint[], %(settle_requests)s::int[],
                         %(settle_tokens)s::bigint[]);

-- name: llm_pause
-- A 429: nobody sends on this key until the upstream's Retry-After has passed.
UPDATE pgbatch.llm_limits
SET paused_until = greatest(paused_until, clock_timestamp() + %(wait_s)s * interval '1 second'),
    pauses = pauses + 1
WHERE name = %(name)s;

-- name: llm_settle
-- In the shard's fenced completion: what its reservations really used, counted in the
-- window from now (after the last send). Ids in order (invariant 6).
UPDATE pgbatch.llm_reservations r
SET requests = v.requests, tokens = v.tokens, settled = true,
    window_at = greatest(r.window_at, now())
FROM unnest(%(ids)s::bigint[], %(requests)s::int[], %(tokens)s::bigint[])
    AS v(id, requests, tokens)
WHERE r.id = v.id;

-- name: llm_batch_usage_add
-- In the shard's fenced completion: its requests' usage added to its batch, per model
-- (sorted: a stable lock order between flushes, invariant 6).
INSERT INTO pgbatch.llm_batch_usage AS u (batch_id, model, requests, failed, upstream_calls,
    rate_limited, cache_hits, prompt_tokens, completion_tokens, cached_tokens)
SELECT %(batch_id)s, v.*
FROM unnest(%(models)s::text[], %(requests)s::bigint[], %(failed)s::bigint[],
            %(calls)s::bigint[], %(rate_limited)s::bigint[], %(cache_hits)s::bigint[],
            %(prompt)s::bigint[], %(completion)s::bigint[], %(cached)s::bigint[])
    AS v(model, requests, failed, calls, rate_limited, cache_hits, prompt, completion, cached)
ORDER BY v.model
ON CONFLICT (batch_id, model) DO UPDATE SET
    requests = u.requests + excluded.requests,
    failed = u.failed + excluded.failed,
    upstream_calls = u.upstream_calls + excluded.upstream_calls,
    rate_limited = u.rate_limited + excluded.rate_limited,
    cache_hits = u.cache_hits + excluded.cache_hits,
    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = u.completion_tokens + excluded.completion_tokens,
    cached_tokens = u.cached_tokens + excluded.cached_tokens;

-- name: llm_batch_usage
SELECT model, requests, failed, upstream_calls, rate_limited, cache_hits, prompt_tokens,
       completion_tokens, cached_tokens
FROM pgbatch.llm_batch_usage
WHERE batch_id = %(batch_id)s
ORDER BY model;

-- name: llm_usage_totals
-- Every batch's usage summed per model, for /metrics.
SELECT model, sum(requests), sum(failed), sum(upstream_calls), sum(rate_limited),
       sum(cache_hits), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
FROM pgbatch.llm_batch_usage
GROUP BY model
ORDER BY model;

-- name: llm_request_usage
SELECT seq, model, attempts, prompt_tokens, completion_tokens, cached_tokens, cache_hit
FROM pgbatch.llm_request_usage
WHERE batch_id = %(batch_id)s
ORDER BY seq;

-- name: llm_cache_get
SELECT key, response, request_id
FROM pgbatch.llm_cache
WHERE tenant = %(tenant)s AND key = ANY(%(keys)s::bytea[]);

-- name: llm_cache_put
-- In the shard's fenced completion: its successful answers, first one kept.
INSERT INTO pgbatch.llm_cache (tenant, key, url, response, request_id)
SELECT %(tenant)s, v.*
FROM unnest(%(keys)s::bytea[], %(urls)s::text[], %(responses)s::jsonb[],
            %(request_ids)s::text[]) AS v(key, url, response, request_id)
ORDER BY v.key
ON CONFLICT (tenant, key) DO NOTHING;

-- name: llm_limits_state
-- Each limit's live state: its budget used in the window, in flight, paused for how long.
SELECT l.name, l.rpm, l.tpm, l.max_in_flight,
       greatest(0, extract(epoch FROM l.paused_until - clock_timestamp()))::float8,
       l.pauses,
       coalesce(w.requests, 0), coalesce(w.tokens, 0), coalesce(f.requests, 0)
FROM pgbatch.llm_limits l
LEFT JOIN LATERAL (
    SELECT sum(r.requests) AS requests, sum(r.tokens) AS tokens
    FROM pgbatch.llm_reservations r
    WHERE r.name = l.name AND r.window_at > now() - %(window_s)s * interval '1 second'
) w ON true
LEFT JOIN LATERAL (
    SELECT sum(r.requests) AS requests
    FROM pgbatch.llm_reservations r
    JOIN pgbatch.shards s
      ON s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'
    WHERE r.name = l.name AND NOT r.settled
) f ON true
ORDER BY l.name;

-- name: llm_request_usage_prune
-- A pruned batch's per-request usage, a bounded chunk at a time (pgbatch's retention).
DELETE FROM pgbatch.llm_request_usage u
WHERE u.batch_id = %(batch_id)s
  AND u.seq IN (SELECT q.seq FROM pgbatch.llm_request_usage q
                WHERE q.batch_id = %(batch_id)s ORDER BY q.seq LIMIT %(limit)s);

-- name: llm_request_usage_exists
SELECT to_regclass('pgbatch.llm_request_usage') IS NOT NULL;
