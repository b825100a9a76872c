-- Demo source database for the sanitised-dump tests: a small web application
-- (orgs, users, projects, an audit log, sessions, invoices in a second schema).
--
-- Loaded into an empty database by one psycopg `conn.execute(script)`: no psql
-- meta-commands, every name schema-qualified. Rows come from generate_series
-- and deterministic expressions only (no random(), no now()), so every load
-- holds the same values.
--
-- Canary rule, checked by tests/integration/test_seeds.py: every non-NULL
-- value of a text-like column (text, varchar, citext, json/jsonb, text[]
-- elements) that allow_list.json does NOT keep contains the lowercase
-- substring 'canary'; no kept column ever does. A dump that contains 'canary'
-- has leaked an original value. Non-text faked columns (inet, uuid, date,
-- numeric, integer[], enum) hold realistic values that tests compare.

CREATE EXTENSION IF NOT EXISTS citext;

CREATE SCHEMA billing;

CREATE TYPE public.user_role AS ENUM ('owner', 'admin', 'member', 'viewer');
CREATE TYPE public.project_status AS ENUM ('planned', 'active', 'paused', 'archived');
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');

-- Not blank, no surrounding spaces: loose enough that a fitted fake passes.
CREATE DOMAIN public.postcode AS varchar(8)
    CHECK (VALUE <> '' AND VALUE = btrim(VALUE));
CREATE DOMAIN public.positive_int AS integer
    CHECK (VALUE > 0);

CREATE TABLE public.orgs (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    slug text NOT NULL,
    seats public.positive_int NOT NULL DEFAULT 5,
    website text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orgs_slug_key UNIQUE (slug)
);
COMMENT ON TABLE public.orgs IS 'Customer organisations (tenants).';

CREATE TABLE public.users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id integer NOT NULL REFERENCES public.orgs (id),
    email public.citext NOT NULL UNIQUE,
    full_name text NOT NULL,
    password_hash text NOT NULL,
    api_token text UNIQUE,
    role public.user_role NOT NULL DEFAULT 'member',
    roles text[],
    is_admin boolean NOT NULL DEFAULT false,
    mood public.mood,
    last_login_ip inet,
    signup_ip inet NOT NULL,
    date_of_birth date,
    phone varchar(20),
    postcode public.postcode,
    country char(2),
    login_count smallint NOT NULL DEFAULT 0 CHECK (login_count >= 0),
    external_id uuid NOT NULL UNIQUE,
    profile jsonb,
    recovery_codes text[],
    created_at timestamptz NOT NULL DEFAULT now(),
    balance numeric(10,2),
    email_domain text GENERATED ALWAYS AS (split_part(email::text, '@', 2)) STORED
);
COMMENT ON TABLE public.users IS 'Application accounts; exactly one owner per org.';
COMMENT ON COLUMN public.users.password_hash IS 'Django-style pbkdf2 hash.';
-- One owner per org (partial unique index on kept columns).
CREATE UNIQUE INDEX users_one_owner_per_org ON public.users (org_id) WHERE role = 'owner';
-- Partial unique index on a faked column: fakes must stay unique.
CREATE UNIQUE INDEX users_phone_key ON public.users (phone) WHERE phone IS NOT NULL;
-- Expression index on a faked column.
CREATE INDEX users_lower_full_name ON public.users (lower(full_name));

CREATE TABLE public.projects (
    id serial PRIMARY KEY,
    org_id integer NOT NULL REFERENCES public.orgs (id) ON DELETE CASCADE,
    owner_id bigint NOT NULL REFERENCES public.users (id),
    name text NOT NULL,
    description text,
    tags text[],
    scores integer[],
    status public.project_status NOT NULL DEFAULT 'planned',
    budget numeric(12,2),
    estimate_hours public.positive_int,
    meta jsonb,
    starts_on date
);
-- Live project names are unique per org; archived ones may repeat.
CREATE UNIQUE INDEX projects_live_name_per_org
    ON public.projects (org_id, name) WHERE status <> 'archived';

CREATE TABLE public.audit_events (
    id bigserial PRIMARY KEY,
    user_id bigint REFERENCES public.users (id) DEFERRABLE INITIALLY DEFERRED,
    action text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    ip inet,
    user_agent text,
    happened_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_user_happened ON public.audit_events (user_id, happened_at);

-- Not in the allow list: never copied.
CREATE TABLE public.api_sessions (
    session_key text PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    data jsonb NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE TABLE billing.invoices (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id integer NOT NULL REFERENCES public.orgs (id),
    number text NOT NULL UNIQUE,
    amount numeric(12,2) NOT NULL CHECK (amount >= 0),
    billing_email text,
    vat_number varchar(14),
    issued_on date NOT NULL,
    status text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'sent', 'paid'))
);
COMMENT ON TABLE billing.invoices IS 'Invoices sent to orgs.';

-- 40 orgs: 8 name prefixes x 5 suffixes.
INSERT INTO public.orgs (id, name, slug, seats, website, created_at)
SELECT i,
       n.name,
       lower(replace(n.name, ' ', '-')),
       5 + (i * 37) % 200,
       CASE WHEN i % 6 = 0 THEN NULL
            ELSE 'https://www.' || lower(replace(n.name, ' ', '-')) || '.example' END,
       timestamptz '2019-01-07 09:00:00+00' + (i - 1) * interval '9 days 3 hours 17 minutes'
FROM generate_series(1, 40) AS i
CROSS JOIN LATERAL (
    SELECT (ARRAY['Northwind', 'Acme', 'Globex', 'Initech', 'Umbrella', 'Stark', 'Wayne',
                  'Hooli'])[1 + (i - 1) % 8]
           || ' '
           || (ARRAY['Traders', 'Analytics', 'Labs', 'Health', 'Logistics'])[1 + (i - 1) / 8]
           AS name
) AS n
ORDER BY i;

-- 400 users; users 1..40 own orgs 1..40.
INSERT INTO public.users (
    id, org_id, email, full_name, password_hash, api_token, role, roles, is_admin, mood,
    last_login_ip, signup_ip, date_of_birth, phone, postcode, country, login_count,
    external_id, profile, recovery_codes, created_at, balance
) OVERRIDING SYSTEM VALUE
SELECT i,
       p.org_id,
       lower(p.first_name) || '.' || lower(replace(replace(p.last_name, ' ', ''), '''', ''))
           || '+canary' || i || '@' || o.slug || '.canary.example',
       p.first_name || ' ' || p.last_name || ' canary' || i,
       'pbkdf2_sha256$600000$canary' || substr(md5('salt-' || i), 1, 12) || '$'
           || encode(sha256(convert_to('password-' || i, 'UTF8')), 'base64'),
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'tok_canary_' || md5('token-' || i) END,
       p.role,
       CASE i % 6 WHEN 0 THEN NULL
                  WHEN 1 THEN '{}'
                  WHEN 2 THEN '{billing}'
                  WHEN 3 THEN '{support}'
                  WHEN 4 THEN '{billing,support}'
                  ELSE '{reports}' END::text[],
       p.role IN ('owner', 'admin'),
       CASE WHEN i % 5 = 2 THEN NULL
            ELSE (ARRAY['sad', 'ok', 'happy']::public.mood[])[1 + i % 3] END,
       CASE WHEN i % 7 = 0 THEN NULL
            WHEN i % 5 = 0 THEN ('2001:db8:' || to_hex(i) || '::' || to_hex(i * 31))::inet
            ELSE ('203.0.113.' || (1 + i % 254))::inet END,
       ('198.51.100.' || (1 + (i * 7) % 254))::inet,
       CASE WHEN i % 9 = 0 THEN NULL ELSE date '1955-03-14' + (i * 997) % 16000 END,
       CASE WHEN i % 4 = 0 THEN NULL ELSE '+44 7700 canary' || lpad(i::text, 3, '0') END,
       CASE WHEN i % 8 = 0 THEN NULL ELSE 'canary' || lpad((i % 100)::text, 2, '0') END,
       CASE WHEN i % 11 = 0 THEN NULL
            ELSE (ARRAY['GB', 'GB', 'FR', 'DE', 'NL', 'IE', 'ES', 'US'])[1 + i % 8] END,
       (i * 37) % 500,
       md5('external-' || i)::uuid,
       CASE WHEN i % 10 = 0 THEN NULL
            ELSE jsonb_build_object(
                'theme', CASE WHEN i % 2 = 0 THEN 'canary-dark' ELSE 'canary-light' END,
                'locale', 'en-GB-canary',
                'newsletter', i % 3 = 0,
                'bio', p.first_name || ' likes canary yellow, ' || (i % 40 + 20) || ' years old',
                'address', jsonb_build_object('line1', i || ' Canary Wharf canary',
                                              'city', 'London canary')
            ) END,
       CASE WHEN i % 3 = 0 THEN NULL
            ELSE ARRAY['canary-' || substr(md5('rc1-' || i), 1, 8),
                       'canary-' || substr(md5('rc2-' || i), 1, 8)] END,
       o.created_at + ((i * 17) % 900) * interval '1 day' + ((i * 13) % 1440) * interval '1 minute',
       CASE WHEN i % 13 = 0 THEN NULL ELSE round(((i * 7919) % 100000) / 100.0 - 150, 2) END
FROM generate_series(1, 400) AS i
CROSS JOIN LATERAL (
    SELECT CASE WHEN i <= 40 THEN i ELSE 1 + (i * 7) % 40 END AS org_id,
           (ARRAY['Ada', 'Alan', 'Grace', 'Edsger', 'Barbara', 'Donald', 'Margaret', 'Linus',
                  'Katherine', 'Dennis', 'Frances', 'Ken', 'Radia', 'Tim', 'Hedy', 'Guido',
                  'Shafi', 'Leslie', 'Sophie', 'Niklaus', 'Annie', 'John', 'Mary', 'Claude',
                  'Karen', 'Bjarne', 'Adele', 'Vint', 'Lynn', 'Whitfield', 'Jean', 'Brian',
                  'Evelyn', 'Larry', 'Carol', 'Martin', 'Joan', 'Peter', 'Ida',
                  'Rosalind'])[1 + (i - 1) % 40] AS first_name,
           (ARRAY['Lovelace', 'Turing', 'Hopper', 'Dijkstra', 'Liskov', 'Knuth', 'Hamilton',
                  'Torvalds', 'Johnson', 'Ritchie', 'Allen', 'Thompson', 'Perlman',
                  'Berners-Lee', 'Lamarr', 'van Rossum', 'Goldwasser', 'Lamport', 'Wilson',
                  'Wirth', 'Easley', 'McCarthy', 'Keller', 'Shannon', 'Sparck Jones',
                  'Stroustrup', 'Goldberg', 'Cerf', 'Conway', 'Diffie', 'Bartik', 'Kernighan',
                  'Boyd', 'Page', 'Shaw', 'Fowler', 'Clarke', 'Naur', 'O''Brien',
                  'Franklin'])[1 + (i * 7 + (i - 1) / 40) % 40] AS last_name,
           CASE WHEN i <= 40 THEN 'owner'
                WHEN i % 10 = 1 THEN 'admin'
                WHEN i % 4 = 0 THEN 'viewer'
                ELSE 'member' END::public.user_role AS role
) AS p
JOIN public.orgs AS o ON o.id = p.org_id
ORDER BY i;

-- 120 projects, 3 per org.
INSERT INTO public.projects (
    id, org_id, owner_id, name, description, tags, scores, status, budget, estimate_hours,
    meta, starts_on
)
SELECT j,
       p.org_id,
       CASE WHEN j % 3 = 0
            THEN coalesce((SELECT min(u.id) FROM public.users AS u
                           WHERE u.org_id = p.org_id AND u.id > 40), p.org_id)
            ELSE p.org_id END,
       p.name,
       CASE WHEN j % 7 = 0 THEN NULL
            ELSE 'Kickoff notes (canary ' || j || '): scope, risks and contacts for ' || p.name
       END,
       CASE j % 5 WHEN 0 THEN '{}'
                  WHEN 1 THEN '{analytics}'
                  WHEN 2 THEN '{internal,q3}'
                  WHEN 3 THEN '{customer-facing,priority}'
                  ELSE NULL END::text[],
       CASE WHEN j % 6 = 0 THEN NULL ELSE ARRAY[(j * 7) % 100, (j * 13) % 100, (j * 29) % 100] END,
       (ARRAY['planned', 'active', 'active', 'paused', 'archived']::public.project_status[])
           [1 + j % 5],
       CASE WHEN j % 4 = 0 THEN NULL ELSE ((j * 104729) % 5000000) / 100.0 END,
       CASE WHEN j % 5 = 0 THEN NULL ELSE 8 + (j * 37) % 600 END,
       CASE WHEN j % 8 = 0 THEN NULL
            ELSE jsonb_build_object(
                'color', 'canary-yellow',
                'tracker', 'canary-PRJ-' || j,
                'contacts', jsonb_build_array('pm+canary' || j || '@example.com')
            ) END,
       CASE WHEN j % 9 = 0 THEN NULL ELSE date '2023-01-02' + (j * 11) % 700 END
FROM generate_series(1, 120) AS j
CROSS JOIN LATERAL (
    SELECT 1 + (j - 1) % 40 AS org_id,
           (ARRAY['Quarterly', 'Customer', 'Mobile', 'Data', 'Billing', 'Growth', 'Platform',
                  'Search', 'Security', 'Onboarding', 'Marketing', 'Infra'])[1 + (j * 5) % 12]
           || ' '
           || (ARRAY['Dashboard', 'Migration', 'Revamp', 'Pipeline', 'Audit', 'Launch', 'Portal',
                     'Rewrite', 'Forecast', 'Integration', 'Experiment',
                     'Cleanup'])[1 + ((j - 1) / 40 * 41 + j) % 12]
           AS name
) AS p
ORDER BY j;

-- 1000 audit events over about two months.
INSERT INTO public.audit_events (id, user_id, action, payload, ip, user_agent, happened_at)
SELECT k,
       CASE WHEN k % 50 = 0 THEN NULL ELSE 1 + (k * 37) % 400 END,
       a.action,
       jsonb_build_object(
           'request_id', 'canary-' || substr(md5('req-' || k), 1, 16),
           'detail', a.action || ' by canary user ' || (1 + (k * 37) % 400),
           'ok', k % 9 <> 0
       ),
       CASE WHEN k % 25 = 0 THEN NULL ELSE ('192.0.2.' || (1 + k % 250))::inet END,
       CASE WHEN k % 20 = 0 THEN NULL
            ELSE (ARRAY['Mozilla/5.0 (X11; Linux x86_64; rv:128.0; canary) Gecko/20100101 Firefox/128.0',
                        'Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5; canary) AppleWebKit/605.1.15 Safari/605.1.15',
                        'Mozilla/5.0 (Windows NT 10.0; Win64; x64; canary) Chrome/126.0 Safari/537.36',
                        'curl/8.5.0 (canary)'])[1 + k % 4] END,
       timestamptz '2024-01-01 00:00:00+00' + k * interval '1 hour 23 minutes 7 seconds'
FROM generate_series(1, 1000) AS k
CROSS JOIN LATERAL (
    SELECT (ARRAY['user.login', 'user.login', 'user.logout', 'project.create', 'project.update',
                  'invoice.send', 'token.rotate', 'user.password_change'])[1 + k % 8] AS action
) AS a
ORDER BY k;

-- 150 live sessions (unlisted table: every text value is a canary).
INSERT INTO public.api_sessions (session_key, user_id, data, expires_at)
SELECT 'canary' || md5('session-' || s),
       1 + (s * 11) % 400,
       jsonb_build_object(
           'csrf_token', 'canary-' || md5('csrf-' || s),
           'cart', jsonb_build_array('canary-item-' || s, 'canary-item-' || (s + 1)),
           'impersonating', s % 17 = 0
       ),
       timestamptz '2025-06-01 00:00:00+00' + s * interval '3 hours 10 minutes'
FROM generate_series(1, 150) AS s
ORDER BY s;

-- 200 invoices.
INSERT INTO billing.invoices (
    id, org_id, number, amount, billing_email, vat_number, issued_on, status
)
SELECT md5('invoice-' || n)::uuid,
       o.id,
       'INV-' || (2023 + n / 100) || '-' || lpad(n::text, 5, '0'),
       ((n * 7907) % 1000000) / 100.0,
       CASE WHEN n % 10 = 0 THEN NULL ELSE 'accounts+canary' || n || '@' || o.slug || '.example' END,
       CASE WHEN n % 4 = 0 THEN NULL
            ELSE 'GBcanary' || lpad(((n * 7919) % 1000000)::text, 6, '0') END,
       date '2023-01-02' + n * 3,
       (ARRAY['draft', 'sent', 'paid', 'paid'])[1 + n % 4]
FROM generate_series(1, 200) AS n
JOIN public.orgs AS o ON o.id = 1 + (n * 3) % 40
ORDER BY n;

-- Explicit ids above: move the sequences past them.
SELECT setval(pg_get_serial_sequence('public.orgs', 'id'), (SELECT max(id) FROM public.orgs));
SELECT setval(pg_get_serial_sequence('public.users', 'id'), (SELECT max(id) FROM public.users));
SELECT setval(pg_get_serial_sequence('public.projects', 'id'),
              (SELECT max(id) FROM public.projects));
SELECT setval(pg_get_serial_sequence('public.audit_events', 'id'),
              (SELECT max(id) FROM public.audit_events));
