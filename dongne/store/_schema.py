"""The schema, as an ordered list of migrations.

``PRAGMA user_version`` records how many have run; at start-up the store runs
the rest, each in its own transaction. Never edit a released migration: add a
new one.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: list[str] = [
    # 1: users, questions, answers (with receipt state), hashtags, inboxes.
    """
    CREATE TABLE users (
        user_id     TEXT PRIMARY KEY,
        nick        TEXT NOT NULL,
        local       INTEGER NOT NULL,
        tags        TEXT NOT NULL,          -- JSON list
        role        TEXT NOT NULL,
        points      INTEGER NOT NULL,
        last_seq    INTEGER NOT NULL,       -- newest durable event seq
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE questions (
        question_id         TEXT PRIMARY KEY,
        asker_id            TEXT NOT NULL REFERENCES users(user_id),
        asker_nick          TEXT NOT NULL,
        title               TEXT NOT NULL,
        body                TEXT NOT NULL,
        lat                 REAL NOT NULL,
        lng                 REAL NOT NULL,
        region              TEXT,
        hashtags            TEXT NOT NULL,  -- JSON list, also in question_hashtags
        urgency             TEXT NOT NULL,
        status              TEXT NOT NULL,
        created_at          INTEGER NOT NULL,
        accepted_answer_id  TEXT,
        answer_count        INTEGER NOT NULL,
        first_answer_at     INTEGER,
        closed_at           INTEGER
    );
    CREATE INDEX questions_by_status ON questions(status, created_at);
    CREATE INDEX questions_by_time ON questions(created_at);
    CREATE TABLE question_hashtags (
        question_id TEXT NOT NULL REFERENCES questions(question_id),
        tag         TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (question_id, tag)
    ) WITHOUT ROWID;
    CREATE INDEX hashtags_by_tag ON question_hashtags(tag, created_at);
    CREATE TABLE answers (
        answer_id     TEXT PRIMARY KEY,
        question_id   TEXT NOT NULL REFERENCES questions(question_id),
        author_id     TEXT NOT NULL REFERENCES users(user_id),
        author_nick   TEXT NOT NULL,
        content       TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        state         TEXT NOT NULL,        -- receipt: sent | delivered | read
        delivered_at  INTEGER,
        read_at       INTEGER,
        accepted      INTEGER NOT NULL
    );
    CREATE INDEX answers_by_question ON answers(question_id, created_at);
    CREATE TABLE events (
        user_id     TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        type        TEXT NOT NULL,
        data        BLOB NOT NULL,          -- msgpack map
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (user_id, seq)
    ) WITHOUT ROWID;
    """,
    # 2: the location engine: notification settings and home positions,
    # escalation progress, who was notified, and the push outbox.
    """
    ALTER TABLE users ADD COLUMN immediate_alerts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN quiet_start INTEGER;
    ALTER TABLE users ADD COLUMN quiet_end INTEGER;
    ALTER TABLE users ADD COLUMN max_alerts_per_hour INTEGER NOT NULL DEFAULT 20;
    ALTER TABLE users ADD COLUMN home_lat REAL;
    ALTER TABLE users ADD COLUMN home_lng REAL;
    CREATE TABLE escalations (
        question_id TEXT PRIMARY KEY REFERENCES questions(question_id),
        next_stage  INTEGER NOT NULL,       -- stages already run
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE notified (
        question_id TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        stage       TEXT NOT NULL,
        distance_m  REAL,
        online      INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        PRIMARY KEY (question_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX notified_by_time ON notified(at);
    CREATE TABLE push_outbox (
        job_id      INTEGER PRIMARY KEY,
        user_id     TEXT NOT NULL,
        kind        TEXT NOT NULL,
        urgent      INTEGER NOT NULL,
        payload     BLOB NOT NULL,          -- msgpack map
        status      TEXT NOT NULL,          -- pending | sent | failed | expired | cancelled | unsent
        attempts    INTEGER NOT NULL,
        last_error  TEXT,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE INDEX push_by_status ON push_outbox(status, job_id);
    """,
    # 3: slow-response alerts: when a question's alert fired.
    """
    ALTER TABLE questions ADD COLUMN alerted_at INTEGER;
    CREATE INDEX questions_by_first_answer ON questions(created_at, first_answer_at);
    """,
    # 4: inboxes as an append-only log. Keyed by (user_id, seq) WITHOUT ROWID,
    # every event (a few hundred bytes of msgpack) went into a random leaf of
    # one wide B-tree: an escalation's fan-out touched a page per recipient
    # and split pages constantly (measured 44 us of CPU per row at 11k rows/s,
    # 14 us this way). Rows now append in rowid order; a narrow unique index
    # on (user_id, seq) keeps per-user reads and the seq rule.
    """
    CREATE TABLE events_log (
        id          INTEGER PRIMARY KEY,
        user_id     TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        type        TEXT NOT NULL,
        data        BLOB NOT NULL,          -- msgpack map
        created_at  INTEGER NOT NULL
    );
    INSERT INTO events_log (user_id, seq, type, data, created_at)
        SELECT user_id, seq, type, data, created_at FROM events ORDER BY created_at, user_id, seq;
    DROP TABLE events;
    ALTER TABLE events_log RENAME TO events;
    CREATE UNIQUE INDEX events_by_user ON events(user_id, seq);
    """,
    # 5: one row the store rewrites to learn whether writes work again after
    # a failed commit (a full disk, an I/O error, a lock held elsewhere).
    """
    CREATE TABLE IF NOT EXISTS store_probe (
        id  INTEGER PRIMARY KEY,
        at  REAL NOT NULL
    );
    """,
    # 6: the read paths. Soft deletes; each user's notification read marker;
    # an index for every list an app screen shows (my questions, my
    # answers, a region's questions, one type of notification).
    """
    ALTER TABLE questions ADD COLUMN deleted_at INTEGER;
    ALTER TABLE answers ADD COLUMN deleted_at INTEGER;
    ALTER TABLE users ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX questions_by_asker ON questions(asker_id, created_at, question_id);
    CREATE INDEX questions_by_region ON questions(region, created_at, question_id) WHERE deleted_at IS NULL;
    CREATE INDEX questions_listed ON questions(created_at, question_id) WHERE deleted_at IS NULL;
    CREATE INDEX questions_open ON questions(created_at, question_id)
        WHERE status IN ('open', 'answered') AND deleted_at IS NULL;
    CREATE INDEX questions_open_by_region ON questions(region, created_at, question_id)
        WHERE status IN ('open', 'answered') AND deleted_at IS NULL;
    CREATE INDEX answers_by_author ON answers(author_id, created_at, answer_id);
    CREATE INDEX events_by_user_type ON events(user_id, type, seq);
    """,
    # 7: moderation. Bans on users (until a time, or for good), hidden
    # questions and answers (hidden ones also carry deleted_at, so every list
    # skips them), users' reports, and the admin actions' audit log.
    """
    ALTER TABLE users ADD COLUMN banned_until INTEGER;
    ALTER TABLE users ADD COLUMN ban_reason TEXT;
    ALTER TABLE questions ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE answers ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE reports (
        report_id    TEXT PRIMARY KEY,
        item_kind    TEXT NOT NULL,         -- question | answer
        item_id      TEXT NOT NULL,
        question_id  TEXT NOT NULL,
        reporter_id  TEXT NOT NULL,
        reason       TEXT NOT NULL,
        note         TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        status       TEXT NOT NULL,         -- open | resolved
        resolved_by  TEXT,
        resolved_at  INTEGER,
        action       TEXT                   -- dismiss | hide | ban
    );
    -- A user has at most one open report of an item (a new one after a
    -- resolution is a new report).
    CREATE UNIQUE INDEX reports_open_once ON reports(item_kind, item_id, reporter_id) WHERE status = 'open';
    CREATE INDEX reports_by_status ON reports(status, created_at, report_id);
    CREATE INDEX reports_listed ON reports(created_at, report_id);
    CREATE TABLE ip_blocks (
        cidr        TEXT PRIMARY KEY,       -- an address or a network, normalised
        until       INTEGER,                -- ms, NULL: until unblocked
        reason      TEXT NOT NULL,
        admin_id    TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE audit_log (
        id        INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        admin_id  TEXT NOT NULL,
        action    TEXT NOT NULL,
        target    TEXT NOT NULL,
        reason    TEXT NOT NULL
    );
    """,
    # 8: alerts leave the per-type inbox index. An escalation's fan-out
    # appends one alert row per local, and each paid a random leaf of this
    # index; a list of one user's alerts reads the user's whole inbox range
    # instead (mostly alerts anyway, for a local). The other types keep it.
    """
    DROP INDEX events_by_user_type;
    CREATE INDEX events_by_user_type ON events(user_id, type, seq) WHERE type <> 'new_question_notification';
    """,
    # 9: admin sign-in codes used, until they expire: a code opens one session, also across a restart
    # and across the nodes sharing the database.
    """
    CREATE TABLE signin_codes_used (
        nonce       TEXT PRIMARY KEY,
        expires_at  REAL NOT NULL           -- epoch seconds
    );
    """,
    # 10: the node that sends each push job: as PostgreSQL's 10 (one node here: always '').
    """
    ALTER TABLE push_outbox ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
    """,
    # 11: the question (and answer) each push job is about: a take-down, or a ban of its target, marks its
    # pending jobs 'cancelled' in the same commit. Jobs from before name none.
    """
    ALTER TABLE push_outbox ADD COLUMN question_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE push_outbox ADD COLUMN answer_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX push_pending_by_question ON push_outbox(question_id, answer_id) WHERE status = 'pending';
    CREATE INDEX push_pending_by_user ON push_outbox(user_id) WHERE status = 'pending';
    """,
    # 12: the database's incarnation, a random name in every push job's Idempotency-Key beside its id. Ids
    # continue from the highest in the outbox, so a restored snapshot gives again ids that jobs made after it
    # had (and the gateway received); a restore (``_backup.restore_snapshot``) writes a new incarnation.
    """
    CREATE TABLE store_incarnation (
        id           INTEGER PRIMARY KEY CHECK (id = 1),
        incarnation  TEXT NOT NULL
    );
    INSERT INTO store_incarnation (id, incarnation) VALUES (1, lower(hex(randomblob(16))));
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
