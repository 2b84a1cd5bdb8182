-- The LLM workload's tables (issue 10), in pgbatch's schema: shared rate limits and their
-- reservations, per-request and per-batch usage, and the opt-in response cache.

-- One row per shared limit (an upstream key, or a key and model): what the deployment
-- configured (every worker writes its configuration when it reserves) and whether a 429
-- paused it for everyone.
CREATE TABLE pgbatch.llm_limits (
    name          text        PRIMARY KEY,
    rpm           integer     CHECK (rpm > 0),
    tpm           integer     CHECK (tpm > 0),
    max_in_flight integer     CHECK (max_in_flight > 0),
    paused_until  timestamptz,
    -- 429s that paused the key (each one a request the upstream refused)
    pauses        bigint      NOT NULL DEFAULT 0
);

-- A shard's worth of requests charged to a limit: reserved before the calls, settled to
-- what the answers used in the shard's fenced completion. A row counts in the sliding
-- minute from window_at (the settle moves it to the commit, after the last send); an
-- unsettled row counts in flight only while its shard runs under the epoch that reserved
-- it, so a crashed worker's in-flight share comes back when its lease is taken over.
CREATE TABLE pgbatch.llm_reservations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    shard_id    bigint      NOT NULL,
    lease_epoch integer     NOT NULL,
    requests    integer     NOT NULL CHECK (requests >= 0),
    tokens      bigint      NOT NULL CHECK (tokens >= 0),
    window_at   timestamptz NOT NULL DEFAULT now(),
    settled     boolean     NOT NULL DEFAULT false
);
CREATE INDEX llm_reservations_window_idx ON pgbatch.llm_reservations (name, window_at);

-- Reserve the longest prefix of a shard's requests (their estimated tokens in order) that
-- the limit allows now, in one call: the row lock of the limit serialises reservers of one
-- key on every machine; each statement below takes a fresh snapshot (READ COMMITTED), so
-- it sees the reservation committed by the reserver it waited for.
CREATE FUNCTION pgbatch.llm_reserve(
    p_name text, p_rpm integer, p_tpm integer, p_max_in_flight integer,
    p_shard_id bigint, p_epoch integer, p_tokens integer[], p_window_s double precision,
    p_settle_ids bigint[], p_settle_requests integer[], p_settle_tokens bigint[]
) RETURNS TABLE (granted integer, granted_tokens bigint, reservation_id bigint,
                 wait_s double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lim            pgbatch.llm_limits;
    used_requests  bigint;
    used_tokens    bigint;
    oldest         timestamptz;
    flying         bigint := 0;
    n              integer := 0;
    total          bigint := 0;
    t              integer;
    blocked_by_flight boolean := false;
    rid            bigint;
BEGIN
    INSERT INTO pgbatch.llm_limits AS l (name, rpm, tpm, max_in_flight)
    VALUES (p_name, p_rpm, p_tpm, p_max_in_flight)
    ON CONFLICT (name) DO UPDATE
        SET rpm = excluded.rpm, tpm = excluded.tpm, max_in_flight = excluded.max_in_flight
    RETURNING * INTO lim;
    -- The shard's previous round is over: settle it here, so it stops counting in flight
    -- (its last round is settled by its completion).
    UPDATE pgbatch.llm_reservations r
    SET requests = v.requests, tokens = v.tokens, settled = true,
        window_at = greatest(r.window_at, now())
    FROM unnest(p_settle_ids, p_settle_requests, p_settle_tokens) AS v(id, requests, tokens)
    WHERE r.id = v.id;
    IF lim.paused_until IS NOT NULL AND lim.paused_until > clock_timestamp() THEN
        RETURN QUERY SELECT 0, 0::bigint, NULL::bigint,
            extract(epoch FROM lim.paused_until - clock_timestamp())::double precision;
        RETURN;
    END IF;
    -- Rows past the window that no live lease holds unsettled are history: drop them.
    DELETE FROM pgbatch.llm_reservations r
    WHERE r.name = p_name AND r.window_at < now() - p_window_s * interval '1 second'
      AND (r.settled OR NOT EXISTS (
          SELECT 1 FROM pgbatch.shards s
          WHERE s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'));
    SELECT coalesce(sum(r.requests), 0), coalesce(sum(r.tokens), 0), min(r.window_at)
    INTO used_requests, used_tokens, oldest
    FROM pgbatch.llm_reservations r
    WHERE r.name = p_name;
    IF p_max_in_flight IS NOT NULL THEN
        SELECT coalesce(sum(r.requests), 0) INTO flying
        FROM pgbatch.llm_reservations r
        JOIN pgbatch.shards s
          ON s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'
        WHERE r.name = p_name AND NOT r.settled;
    END IF;
    FOREACH t IN ARRAY p_tokens LOOP
        EXIT WHEN p_rpm IS NOT NULL AND used_requests + n + 1 > p_rpm;
        EXIT WHEN p_tpm IS NOT NULL AND used_tokens + total + t > p_tpm;
        IF p_max_in_flight IS NOT NULL AND flying + n + 1 > p_max_in_flight THEN
            blocked_by_flight := true;
            EXIT;
        END IF;
        n := n + 1;
        total := total + t;
    END LOOP;
    IF n = 0 THEN
        -- Until the oldest charge leaves the window (or, for the in-flight bound, a
        -- shard's calls are likely back): the caller snoozes that long.
        RETURN QUERY SELECT 0, 0::bigint, NULL::bigint, CASE
            WHEN blocked_by_flight OR oldest IS NULL THEN 0.5
            ELSE greatest(0.05, extract(epoch FROM
                oldest + p_window_s * interval '1 second' - clock_timestamp()))::double precision
        END;
        RETURN;
    END IF;
    INSERT INTO pgbatch.llm_reservations (name, shard_id, lease_epoch, requests, tokens)
    VALUES (p_name, p_shard_id, p_epoch, n, total)
    RETURNING id INTO rid;
    RETURN QUERY SELECT n, total, rid, 0::double precision;
END
$$;

-- What each request used, written with its result in the shard's completion. Not keyed:
-- a retried batch reruns its failed requests, and each run's usage is a row.
CREATE TABLE pgbatch.llm_request_usage (
    -- No foreign key: pgbatch's retention deletes these rows in chunks (the workload's
    -- prune hook), where a cascade would delete a million requests in one transaction.
    batch_id          bigint  NOT NULL,
    seq               bigint  NOT NULL,
    model             text    NOT NULL,
    -- sends to the upstream (0 for a cache hit); 429s included
    attempts          integer NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cached_tokens     integer NOT NULL,
    cache_hit         boolean NOT NULL
);
CREATE INDEX llm_request_usage_batch_idx ON pgbatch.llm_request_usage (batch_id, seq);

-- A batch's totals per model, added to once per shard in its fenced completion.
CREATE TABLE pgbatch.llm_batch_usage (
    batch_id          bigint NOT NULL REFERENCES pgbatch.batches (id) ON DELETE CASCADE,
    model             text   NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    upstream_calls    bigint NOT NULL DEFAULT 0,
    rate_limited      bigint NOT NULL DEFAULT 0,
    cache_hits        bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cached_tokens     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model)
);

-- Successful answers of batches that opted in, by the request's canonical key
-- (usage.cache_key), per tenant: one tenant cannot learn what another asked.
CREATE TABLE pgbatch.llm_cache (
    tenant     text        NOT NULL,
    key        bytea       NOT NULL,
    url        text        NOT NULL,
    response   jsonb       NOT NULL,
    request_id text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key)
);
