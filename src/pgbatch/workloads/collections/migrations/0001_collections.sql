-- The collection-copy workload's tables, in pgbatch's schema (names a user's own
-- `collections` table cannot collide with). Keys are text in the "C" collation: byte
-- order, the same as Python's sort of str, and compared with memcmp.
--
-- Before workload migrations (pgbatch at dbe590b) these tables were created at run time
-- in the schema first on the search_path. Such tables move here with their rows: a table
-- is taken for pgbatch's when collections and collection_items both exist with the
-- columns pgbatch gave them.
DO $move$
DECLARE
    old_schema text;
    t          text;
BEGIN
    IF to_regclass('pgbatch.collections') IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT n.nspname INTO old_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('collections');
    IF old_schema IS NULL OR to_regclass(format('%I.collection_items', old_schema)) IS NULL
       OR (SELECT count(*) FROM pg_attribute
           WHERE attrelid = format('%I.collections', old_schema)::regclass
             AND attname IN ('id', 'name', 'created_at') AND NOT attisdropped) < 3
       OR (SELECT count(*) FROM pg_attribute
           WHERE attrelid = format('%I.collection_items', old_schema)::regclass
             AND attname IN ('collection_id', 'item_id') AND NOT attisdropped) < 2 THEN
        RETURN;
    END IF;
    FOREACH t IN ARRAY ARRAY['collections', 'collection_items', 'collection_copy_stats'] LOOP
        IF to_regclass(format('%I.%I', old_schema, t)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA pgbatch', old_schema, t);
        END IF;
    END LOOP;
END
$move$;

-- Every key starts with the tenant: collections are a tenant's own (issue 9),
-- so two tenants may both have a "companies" and neither can name the other's.
-- collection_items has no foreign key to collections on purpose: a copy of a million
-- associations would run a million referential checks, each locking the same collections
-- row; the workload checks that both collections exist when a copy is submitted, and the
-- copy's statement inserts only into a target its batch's tenant has.
-- collection_copy_stats gets one row per completed shard of a copy, written by the
-- shard's own fenced statement: no row is shared by two shards, so no row is hot. It is
-- keyed by batch, and a batch is its tenant's already.
CREATE TABLE IF NOT EXISTS pgbatch.collections (
    tenant     text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS pgbatch.collection_items (
    tenant        text COLLATE "C" NOT NULL,
    collection_id text COLLATE "C" NOT NULL,
    item_id       text COLLATE "C" NOT NULL,
    PRIMARY KEY (tenant, collection_id, item_id)
);
CREATE TABLE IF NOT EXISTS pgbatch.collection_copy_stats (
    batch_id        bigint NOT NULL,
    shard_id        bigint NOT NULL,
    inserted        bigint NOT NULL,
    already_present bigint NOT NULL,
    not_in_source   bigint NOT NULL,
    PRIMARY KEY (batch_id, shard_id)
);
-- Tables made before collections had tenants (moved here above): add the column (the
-- existing rows become the 'default' tenant's, where the library and an unauthenticated
-- API put them) and rebuild the primary key with the tenant first. The default is dropped again, so a
-- statement that forgets the tenant fails instead of writing into 'default'.
DO $upgrade$
DECLARE
    t    text;
    keys text;
    pkey text;
BEGIN
    FOREACH t IN ARRAY ARRAY['collections', 'collection_items'] LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_attribute
            WHERE attrelid = ('pgbatch.' || t)::regclass AND attname = 'tenant' AND NOT attisdropped
        ) THEN
            keys := CASE t WHEN 'collections' THEN 'tenant, id'
                           ELSE 'tenant, collection_id, item_id' END;
            SELECT conname INTO pkey FROM pg_constraint
            WHERE conrelid = ('pgbatch.' || t)::regclass AND contype = 'p';
            EXECUTE format(
                'ALTER TABLE pgbatch.%I ADD COLUMN tenant text COLLATE "C" NOT NULL DEFAULT ''default''',
                t);
            EXECUTE format('ALTER TABLE pgbatch.%I ALTER COLUMN tenant DROP DEFAULT', t);
            IF pkey IS NOT NULL THEN
                EXECUTE format('ALTER TABLE pgbatch.%I DROP CONSTRAINT %I', t, pkey);
            END IF;
            EXECUTE format('ALTER TABLE pgbatch.%I ADD PRIMARY KEY (%s)', t, keys);
        END IF;
    END LOOP;
END
$upgrade$;
