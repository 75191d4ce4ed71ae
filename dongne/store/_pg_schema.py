"""The PostgreSQL schema, as an ordered list of migrations.

``dongne_schema.version`` records how many have run; at start-up the store
runs the rest, each in its own transaction, under an advisory lock so that
two nodes starting together migrate once. Never edit a released migration:
add a new one.

Migration 1 is SQLite's schema 7 (``_schema.py``) in PostgreSQL's types, with
two differences made for the multi-node stage to come:

- ``inbox_heads``: one row per user holding the newest durable seq, upserted
  in the commit that appends the events (rows in user order, so two commits
  lock them in the same order). Pruning keeps each user's newest event by
  it, and start-up reads every user's ``last_seq`` from it rather than from a
  scan of the inbox. Several writers will allocate seqs by it.
- Identifiers sort bytewise (``COLLATE "C"``), as in SQLite and in the
  engine's memory: page cursors compare ``(created_at, id)`` pairs, which
  must order the same in every database whatever its locale.

Migration 2 adds what several nodes on one database need (``CLUSTER.md``):
the node registry, the escalation lease with the check every escalation
commit runs, the check of the inbox heads a commit's seqs continue from, and
the sequence push job ids are taken from in blocks.

Migration 4 marks each user, question and answer row with the transaction
that last changed it (``changed_xid``, set by a trigger), for the catch-up
of nodes that missed notifications (``PostgresStore.read_changes``).

Integers that hold times, seqs, points or ids are ``bigint`` (SQLite's
INTEGER is 64-bit); flags stay integers (0/1), as in SQLite, so both backends
share the row mapping in ``_rows.py``.
"""

from __future__ import annotations

__all__ = ["PG_MIGRATIONS", "PG_SCHEMA_VERSION"]

PG_MIGRATIONS: list[str] = [
    # 1: everything SQLite's migrations 1-7 build, plus the inbox heads.
    """
    CREATE TABLE users (
        user_id             text COLLATE "C" PRIMARY KEY,
        nick                text NOT NULL,
        local               integer NOT NULL,
        tags                text NOT NULL,          -- JSON list
        role                text NOT NULL,
        points              bigint NOT NULL,
        last_seq            bigint NOT NULL,        -- as of the row's last save; inbox_heads has the truth
        created_at          bigint NOT NULL,
        immediate_alerts    integer NOT NULL DEFAULT 1,
        quiet_start         integer,
        quiet_end           integer,
        max_alerts_per_hour integer NOT NULL DEFAULT 20,
        home_lat            double precision,
        home_lng            double precision,
        read_seq            bigint NOT NULL DEFAULT 0,
        banned_until        bigint,
        ban_reason          text
    );
    CREATE TABLE questions (
        question_id         text COLLATE "C" PRIMARY KEY,
        asker_id            text COLLATE "C" NOT NULL REFERENCES users(user_id),
        asker_nick          text NOT NULL,
        title               text NOT NULL,
        body                text NOT NULL,
        lat                 double precision NOT NULL,
        lng                 double precision NOT NULL,
        region              text COLLATE "C",
        hashtags            text NOT NULL,          -- JSON list, also in question_hashtags
        urgency             text NOT NULL,
        status              text NOT NULL,
        created_at          bigint NOT NULL,
        accepted_answer_id  text COLLATE "C",
        answer_count        integer NOT NULL,
        first_answer_at     bigint,
        closed_at           bigint,
        alerted_at          bigint,
        deleted_at          bigint,
        hidden              integer NOT NULL DEFAULT 0
    );
    CREATE INDEX questions_by_status ON questions (status, created_at);
    CREATE INDEX questions_by_time ON questions (created_at);
    CREATE INDEX questions_by_first_answer ON questions (created_at, first_answer_at);
    CREATE INDEX questions_by_asker ON questions (asker_id, created_at, question_id);
    CREATE INDEX questions_by_region ON questions (region, created_at, question_id) WHERE deleted_at IS NULL;
    CREATE INDEX questions_listed ON questions (created_at, question_id) WHERE deleted_at IS NULL;
    CREATE INDEX questions_open ON questions (created_at, question_id)
        WHERE status IN ('open', 'answered') AND deleted_at IS NULL;
    CREATE INDEX questions_open_by_region ON questions (region, created_at, question_id)
        WHERE status IN ('open', 'answered') AND deleted_at IS NULL;
    CREATE TABLE question_hashtags (
        question_id text COLLATE "C" NOT NULL REFERENCES questions(question_id),
        tag         text COLLATE "C" NOT NULL,
        created_at  bigint NOT NULL,
        PRIMARY KEY (question_id, tag)
    );
    -- SQLite's index on (tag, created_at) carries the primary key; here it is spelled out.
    CREATE INDEX hashtags_by_tag ON question_hashtags (tag, created_at, question_id);
    CREATE TABLE answers (
        answer_id     text COLLATE "C" PRIMARY KEY,
        question_id   text COLLATE "C" NOT NULL REFERENCES questions(question_id),
        author_id     text COLLATE "C" NOT NULL REFERENCES users(user_id),
        author_nick   text NOT NULL,
        content       text NOT NULL,
        created_at    bigint NOT NULL,
        state         text NOT NULL,                -- receipt: sent | delivered | read
        delivered_at  bigint,
        read_at       bigint,
        accepted      integer NOT NULL,
        deleted_at    bigint,
        hidden        integer NOT NULL DEFAULT 0
    );
    CREATE INDEX answers_by_question ON answers (question_id, created_at, answer_id);
    CREATE INDEX answers_by_author ON answers (author_id, created_at, answer_id);
    -- The inbox: an append-only log; (user_id, seq) is unique, a second row for it is refused.
    CREATE TABLE events (
        user_id     text COLLATE "C" NOT NULL,
        seq         bigint NOT NULL,
        type        text COLLATE "C" NOT NULL,
        data        bytea NOT NULL,                 -- msgpack map
        created_at  bigint NOT NULL
    );
    CREATE UNIQUE INDEX events_by_user ON events (user_id, seq);
    CREATE INDEX events_by_user_type ON events (user_id, type, seq);
    CREATE INDEX events_by_time ON events (created_at);  -- pruning, oldest first
    CREATE TABLE inbox_heads (
        user_id     text COLLATE "C" PRIMARY KEY,
        last_seq    bigint NOT NULL
    );
    CREATE TABLE escalations (
        question_id text COLLATE "C" PRIMARY KEY REFERENCES questions(question_id),
        next_stage  integer NOT NULL,               -- stages already run
        updated_at  bigint NOT NULL
    );
    CREATE TABLE notified (
        question_id text COLLATE "C" NOT NULL,
        user_id     text COLLATE "C" NOT NULL,
        stage       text NOT NULL,
        distance_m  double precision,
        online      integer NOT NULL,
        at          bigint NOT NULL,
        PRIMARY KEY (question_id, user_id)
    );
    CREATE INDEX notified_by_time ON notified (at);
    CREATE TABLE push_outbox (
        job_id      bigint PRIMARY KEY,
        user_id     text COLLATE "C" NOT NULL,
        kind        text NOT NULL,
        urgent      integer NOT NULL,
        payload     bytea NOT NULL,                 -- msgpack map
        status      text NOT NULL,                  -- pending | sent | failed | expired | cancelled | unsent
        attempts    integer NOT NULL,
        last_error  text,
        created_at  bigint NOT NULL,
        updated_at  bigint NOT NULL
    );
    CREATE INDEX push_by_status ON push_outbox (status, job_id);
    CREATE TABLE store_probe (
        id  integer PRIMARY KEY,
        at  double precision NOT NULL
    );
    CREATE TABLE reports (
        report_id    text COLLATE "C" PRIMARY KEY,
        item_kind    text NOT NULL,                 -- question | answer
        item_id      text COLLATE "C" NOT NULL,
        question_id  text COLLATE "C" NOT NULL,
        reporter_id  text COLLATE "C" NOT NULL,
        reason       text NOT NULL,
        note         text NOT NULL,
        created_at   bigint NOT NULL,
        status       text NOT NULL,                 -- open | resolved
        resolved_by  text,
        resolved_at  bigint,
        action       text                           -- dismiss | hide | ban
    );
    CREATE UNIQUE INDEX reports_open_once ON reports (item_kind, item_id, reporter_id) WHERE status = 'open';
    CREATE INDEX reports_by_status ON reports (status, created_at, report_id);
    CREATE INDEX reports_listed ON reports (created_at, report_id);
    CREATE TABLE ip_blocks (
        cidr        text PRIMARY KEY,               -- an address or a network, normalised
        until       bigint,                         -- ms, NULL: until unblocked
        reason      text NOT NULL,
        admin_id    text NOT NULL,
        created_at  bigint NOT NULL
    );
    CREATE TABLE audit_log (
        id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at        bigint NOT NULL,
        admin_id  text NOT NULL,
        action    text NOT NULL,
        target    text NOT NULL,
        reason    text NOT NULL
    );
    """,
    # 2: the cluster's rows (CLUSTER.md): nodes, the escalation lease, blocks of push job ids.
    """
    CREATE TABLE cluster_nodes (
        node_id       text COLLATE "C" PRIMARY KEY,
        host          text NOT NULL,
        pid           integer NOT NULL,
        started_at    bigint NOT NULL,              -- ms, the node's wall clock
        heartbeat_at  bigint NOT NULL
    );
    CREATE TABLE escalation_lease (
        name        text COLLATE "C" PRIMARY KEY,   -- one row: 'escalation'
        holder      text COLLATE "C",               -- a node id, NULL: free
        epoch       bigint NOT NULL,                -- bumped whenever a new holder takes it
        expires_at  bigint NOT NULL                 -- ms
    );
    INSERT INTO escalation_lease (name, holder, epoch, expires_at) VALUES ('escalation', NULL, 0, 0);
    -- Run first in a commit that carries an epoch: the row is taken FOR SHARE, so a
    -- steal (an UPDATE) waits for that commit; a moved epoch aborts it (SQLSTATE DL001).
    CREATE FUNCTION dongne_check_lease(lease_name text, expected bigint) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        current_epoch bigint;
    BEGIN
        SELECT epoch INTO current_epoch FROM escalation_lease WHERE name = lease_name FOR SHARE;
        IF current_epoch IS DISTINCT FROM expected THEN
            RAISE EXCEPTION 'lease % lost: epoch % is now %', lease_name, expected, current_epoch
                USING ERRCODE = 'DL001';
        END IF;
    END
    $$;
    -- Run first in a commit that appends events, when the writers' seqs are guarded (several nodes):
    -- locks the users' heads in user order (two commits cannot deadlock) and aborts (SQLSTATE DL002,
    -- the users in DETAIL as a JSON list) unless each head is where the commit's seqs continue from.
    CREATE FUNCTION dongne_check_heads(users text[], expected bigint[]) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE
        moved text[];
    BEGIN
        PERFORM 1 FROM inbox_heads WHERE user_id = ANY(users) ORDER BY user_id FOR UPDATE;
        SELECT array_agg(u.user_id ORDER BY u.user_id) INTO moved
            FROM unnest(users, expected) AS u(user_id, last_seq)
            LEFT JOIN inbox_heads h ON h.user_id = u.user_id COLLATE "C"
            WHERE coalesce(h.last_seq, 0) <> u.last_seq;
        IF moved IS NOT NULL THEN
            RAISE EXCEPTION 'inbox heads moved for % user(s)', cardinality(moved)
                USING ERRCODE = 'DL002', DETAIL = to_json(moved)::text;
        END IF;
    END
    $$;
    -- Each value is a block of 2^32 push job ids; the first block starts above any id given so far.
    CREATE SEQUENCE push_job_blocks AS bigint MINVALUE 0;
    SELECT setval('push_job_blocks', (SELECT coalesce(max(job_id), 0) >> 32 FROM push_outbox) + 1, false);
    """,
    # 3: as SQLite's 8: alerts leave the per-type inbox index (an escalation's
    # fan-out paid a random leaf of it per alert).
    """
    DROP INDEX events_by_user_type;
    CREATE INDEX events_by_user_type ON events (user_id, type, seq) WHERE type <> 'new_question_notification';
    """,
    # 4: which transaction last changed each user, question and answer (CLUSTER.md, "Question and user
    # state across nodes"): a node that missed notifications reads the rows changed by transactions it may
    # not have seen, from the oldest one still running when it last looked (pg_snapshot_xmin).
    """
    CREATE FUNCTION dongne_mark_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        NEW.changed_xid := pg_current_xact_id();
        RETURN NEW;
    END
    $$;
    ALTER TABLE users ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
    ALTER TABLE questions ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
    ALTER TABLE answers ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
    CREATE TRIGGER users_changed BEFORE INSERT OR UPDATE ON users
        FOR EACH ROW EXECUTE FUNCTION dongne_mark_changed();
    CREATE TRIGGER questions_changed BEFORE INSERT OR UPDATE ON questions
        FOR EACH ROW EXECUTE FUNCTION dongne_mark_changed();
    CREATE TRIGGER answers_changed BEFORE INSERT OR UPDATE ON answers
        FOR EACH ROW EXECUTE FUNCTION dongne_mark_changed();
    CREATE INDEX users_by_change ON users (changed_xid);
    CREATE INDEX questions_by_change ON questions (changed_xid);
    CREATE INDEX answers_by_change ON answers (changed_xid);
    """,
    # 5: where each node's connected users are (CLUSTER.md, "Nearest locals across nodes"): every node
    # writes its own in batches and keeps an R-tree of everyone's. A user connected to two nodes has two
    # rows; a node's rows go with its last connection of the user, its graceful stop, or its expiry.
    """
    CREATE TABLE positions (
        user_id  text COLLATE "C" NOT NULL,
        lat      double precision NOT NULL,
        lng      double precision NOT NULL,
        at       bigint NOT NULL,
        node_id  text COLLATE "C" NOT NULL,
        PRIMARY KEY (user_id, node_id)
    );
    CREATE INDEX positions_by_node ON positions (node_id);
    """,
    # 6: a connected user who shared no position has a row too (lat and lng NULL): other nodes then know
    # them online and send them no push.
    """
    ALTER TABLE positions ALTER COLUMN lat DROP NOT NULL, ALTER COLUMN lng DROP NOT NULL;
    """,
    # 7: the region the placing node named, so that every node counts every node's locals by region (admin).
    """
    ALTER TABLE positions ADD COLUMN region text;
    """,
    # 8: who is in which question's room on each node (CLUSTER.md, "Room members across nodes"): every node
    # writes its own in batches and keeps a replica of the others', so a join_question reply lists the room's
    # members on every node. A node's rows go with the user's last connection in the room there, the node's
    # graceful stop, or its expiry.
    """
    CREATE TABLE room_members (
        question_id  text COLLATE "C" NOT NULL,
        user_id      text COLLATE "C" NOT NULL,
        node_id      text COLLATE "C" NOT NULL,
        PRIMARY KEY (question_id, user_id, node_id)
    );
    CREATE INDEX room_members_by_node ON room_members (node_id);
    """,
    # 9: admin sign-in codes used, until they expire: a code opens one session on one node, once.
    """
    CREATE TABLE signin_codes_used (
        nonce       text COLLATE "C" PRIMARY KEY,
        expires_at  double precision NOT NULL
    );
    """,
    # 10: the node that sends each push job (CLUSTER.md, "Push jobs across nodes"): a node reads back only
    # its own pending jobs; those of a node gone from cluster_nodes are adopted, once, by the lease holder
    # (their node_id becomes '<holder> adopted'). Rows from before: '', a node that is gone.
    """
    ALTER TABLE push_outbox ADD COLUMN node_id text COLLATE "C" NOT NULL DEFAULT '';
    CREATE INDEX push_pending_by_node ON push_outbox (node_id, job_id) WHERE status = 'pending';
    """,
    # 11: as SQLite's 11: the question (and answer) each push job is about, to cancel its pending jobs.
    """
    ALTER TABLE push_outbox ADD COLUMN question_id text COLLATE "C" NOT NULL DEFAULT '';
    ALTER TABLE push_outbox ADD COLUMN answer_id text COLLATE "C" NOT NULL DEFAULT '';
    CREATE INDEX push_pending_by_question ON push_outbox (question_id, answer_id) WHERE status = 'pending';
    CREATE INDEX push_pending_by_user ON push_outbox (user_id) WHERE status = 'pending';
    """,
    # 12: as SQLite's 12: the database's incarnation, in every push job's Idempotency-Key. A database restored
    # from a backup must be given a new one before dongne starts on it (README, "Backups").
    """
    CREATE TABLE store_incarnation (
        id           integer PRIMARY KEY CHECK (id = 1),
        incarnation  text COLLATE "C" NOT NULL
    );
    INSERT INTO store_incarnation (id, incarnation) VALUES (1, replace(gen_random_uuid()::text, '-', ''));
    """,
]

PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
