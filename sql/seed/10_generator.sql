-- Deterministic datasets for the app schema: seed.generate(variant, scale).
--   'dev'   the data to promote: 200*scale users, 1000*scale questions, ~27k*scale rows.
--   'prod'  a diverged production: only the first 150*scale dev users exist in auth (with
--           different metadata), prod-only users and activity, baseline rows re-inserted by
--           migration seeds, other questions published with other topic links.
-- Every value derives from md5 of a counter, so the same call gives the same rows (and
-- checksums) on any server. Some rows carry text that COPY must escape (tabs, newlines,
-- backslashes, non-Latin), NULL next to empty strings, arrays, jsonb, bytea and intervals.
-- Questions are inserted as drafts and published once linked: the guardrails stay on.
CREATE SCHEMA IF NOT EXISTS seed;

CREATE OR REPLACE FUNCTION seed.generate(variant text, scale integer DEFAULT 1) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  s integer := greatest(scale, 1);
  is_dev boolean := variant = 'dev';
  n_users integer := CASE WHEN variant = 'dev' THEN 200 * greatest(scale, 1) ELSE 150 * greatest(scale, 1) END;
  n_extra integer := CASE WHEN variant = 'dev' THEN 0 ELSE 20 * greatest(scale, 1) END;
  n_sub integer := 20;
  n_topics integer := 100 * greatest(scale, 1);
  n_q integer := CASE WHEN variant = 'dev' THEN 1000 ELSE 900 END * greatest(scale, 1);
  n_pl integer := 100 * greatest(scale, 1);
  salt text := variant;
BEGIN
  IF variant NOT IN ('dev', 'prod') THEN
    RAISE EXCEPTION 'seed.generate: variant must be dev or prod, not %', variant;
  END IF;

  -- Auth users (the handle_new_user trigger creates their public.users rows).
  INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password,
      email_confirmed_at, last_sign_in_at, raw_app_meta_data, raw_user_meta_data,
      is_super_admin, created_at, updated_at, phone, phone_confirmed_at, is_sso_user)
  SELECT '00000000-0000-0000-0000-000000000000', u.id, 'authenticated', 'authenticated',
         u.email, '$2a$10$' || md5('pw' || u.key), timestamptz '2026-01-01' + u.i * interval '1 minute',
         CASE WHEN is_dev THEN NULL ELSE timestamptz '2026-06-01' + u.i * interval '1 hour' END,
         '{"provider": "email", "providers": ["email"]}',
         jsonb_build_object('display_name', CASE WHEN u.i % 17 = 0 THEN 'Zoë ' ELSE 'User ' END || u.i, 'env', salt),
         false, timestamptz '2026-01-01' + u.i * interval '1 minute', timestamptz '2026-02-01',
         CASE WHEN u.i % 5 = 0 THEN u.phone_prefix || lpad(u.i::text, 7, '0') END,
         CASE WHEN u.i % 10 = 0 THEN timestamptz '2026-01-02' END, false
  FROM (
    SELECT i, 'user-' || i AS key, md5('user-' || i)::uuid AS id, 'user' || i || '@example.com' AS email,
           '+1555' AS phone_prefix
    FROM generate_series(1, n_users) i
    UNION ALL
    SELECT n_users + i, 'prod-user-' || i, md5('prod-user-' || i)::uuid, 'prod' || i || '@example.com',
           '+1666'
    FROM generate_series(1, n_extra) i
  ) u;

  INSERT INTO auth.identities (id, provider_id, user_id, identity_data, provider, created_at, updated_at)
  SELECT md5('identity-' || u.id)::uuid, u.id::text, u.id,
         jsonb_build_object('sub', u.id::text, 'email', u.email, 'email_verified', true),
         'email', u.created_at, u.created_at
  FROM auth.users u;

  UPDATE public.users SET
    bio = CASE WHEN substr(id::text, 1, 1) IN ('0', '1') THEN NULL
               WHEN substr(id::text, 1, 1) = '2' THEN ''
               ELSE 'Learner ' || substr(md5(salt || id::text), 1, 8) END,
    avatar_url = CASE WHEN substr(id::text, 2, 1) < '8' THEN 'https://cdn.example.com/a/' || id || '.png' END,
    created_at = timestamptz '2026-01-01',
    updated_at = timestamptz '2026-03-01';

  INSERT INTO public.user_preferences (user_id, theme, daily_goal, settings, updated_at)
  SELECT id, (ARRAY['light', 'dark', 'system'])[1 + get_byte(decode(md5(salt || id::text), 'hex'), 0) % 3],
         5 + get_byte(decode(md5(id::text), 'hex'), 1) % 20,
         jsonb_build_object('notifications', substr(id::text, 1, 1) < '8', 'locale', 'en-US'),
         timestamptz '2026-03-01'
  FROM public.users WHERE substr(id::text, 3, 1) <> 'f';

  -- Taxonomy. Prod carries baseline rows its migration seeds re-inserted.
  INSERT INTO public.categories (id, slug, name, description, sort_order) OVERRIDING SYSTEM VALUE
  SELECT i, slug, name, descr, i FROM (VALUES
      (1, 'mathematics', 'Mathematics', 'Numbers, algebra & proofs'),
      (2, 'science', 'Science', E'Physics\tChemistry\tBiology'),
      (3, 'languages', 'Languages', 'Ελληνικά, 日本語, العربية'),
      (4, 'history', 'History', NULL),
      (5, 'computing', 'Computing', '')) AS c(i, slug, name, descr)
  WHERE is_dev OR i <= 3;
  IF NOT is_dev THEN
    INSERT INTO public.categories (id, slug, name, description, sort_order) OVERRIDING SYSTEM VALUE
    VALUES (4, 'general', 'General', 'baseline seed row', 0),
           (5, 'uncategorized', 'Uncategorized', 'baseline seed row', 99);
  END IF;

  INSERT INTO public.subcategories (id, category_id, slug, name)
  SELECT i, 1 + (i - 1) % 5, 'sub-' || i, 'Subcategory ' || i || CASE WHEN is_dev THEN '' ELSE ' (prod)' END
  FROM generate_series(1, n_sub) i;

  INSERT INTO public.topics (id, subcategory_id, parent_topic_id, slug, name, tags)
  SELECT i, 1 + (i - 1) % n_sub,
         CASE WHEN i > n_sub THEN i - n_sub END,
         'topic-' || i, 'Topic ' || i,
         CASE WHEN i % 4 = 0 THEN ARRAY['core', 'exam'] WHEN i % 4 = 1 THEN ARRAY[]::text[]
              ELSE ARRAY['tag "' || i || '"', E'back\\slash'] END
  FROM generate_series(1, n_topics) i;

  INSERT INTO public.topic_edges (from_topic_id, to_topic_id, relation, weight)
  SELECT i, i + 1, 'prerequisite', 1.0 / (1 + i % 7) FROM generate_series(1, n_topics - 1) i
  UNION ALL
  SELECT i, i + 2, 'related', 0.5 FROM generate_series(1, n_topics - 2, 3) i;

  -- Questions: all drafts first, linked to topics, then a share published.
  INSERT INTO public.questions (id, subcategory_id, author_id, status, difficulty, title, body,
      metadata, score, created_at, updated_at) OVERRIDING SYSTEM VALUE
  SELECT i, 1 + (i - 1) % n_sub,
         CASE WHEN i % 11 = 0 THEN NULL ELSE md5('user-' || (1 + i % n_users))::uuid END,
         'draft', (ARRAY['easy', 'medium', 'hard']::public.difficulty[])[1 + i % 3],
         CASE i % 50
           WHEN 1 THEN E'Tabs\there and\ttwice'
           WHEN 2 THEN E'Line one\nline two\r\nline three'
           WHEN 3 THEN E'Backslash \\ and \\N and \\.'
           WHEN 4 THEN 'Ελληνικά · 日本語 · emoji 🎉 · ünïcødé'
           ELSE initcap(salt) || ' question ' || i || ': ' || substr(md5(salt || i), 1, 12)
         END,
         repeat(md5(salt || 'body' || i), 1 + i % 4),
         CASE WHEN i % 7 = 0 THEN NULL
              ELSE jsonb_build_object('source', salt, 'n', i, 'hints', jsonb_build_array('a', i % 3)) END,
         CASE WHEN i % 9 = 0 THEN NULL ELSE round((i % 1000) / 10.0, 2) END,
         timestamptz '2026-01-01' + i * interval '10 minutes',
         timestamptz '2026-02-01' + i * interval '10 minutes'
  FROM generate_series(1, n_q) i;

  INSERT INTO public.question_topics (question_id, topic_id)
  SELECT DISTINCT q, t FROM (
    SELECT i AS q, 1 + (i * 7) % n_topics AS t FROM generate_series(1, n_q) i
    UNION ALL
    SELECT i, 1 + (i * 13 + CASE WHEN is_dev THEN 0 ELSE 5 END) % n_topics
    FROM generate_series(1, n_q) i WHERE i % 2 = 0
  ) links;

  UPDATE public.questions
  SET status = CASE WHEN id % 3 = 0 THEN 'review'::public.question_status ELSE 'published' END,
      published_at = CASE WHEN id % 3 = 0 THEN NULL ELSE timestamptz '2026-03-01' + id * interval '1 minute' END
  WHERE id % (CASE WHEN is_dev THEN 5 ELSE 4 END) <> 0;

  INSERT INTO public.answers (id, question_id, position, body, is_correct, explanation) OVERRIDING SYSTEM VALUE
  SELECT (q - 1) * 4 + p, q, p,
         CASE WHEN p = 4 AND q % 25 = 0 THEN E'Answer with\ttab' ELSE 'Answer ' || p || ' to ' || q END,
         p = 1 + q % 4,
         CASE p WHEN 1 THEN NULL WHEN 2 THEN '' ELSE 'Because ' || substr(md5(salt || q || p), 1, 10) END
  FROM generate_series(1, n_q) q, generate_series(1, 4) p;

  INSERT INTO public.content_revisions (id, question_id, editor_id, revision, diff, note, created_at)
  SELECT (q - 1) * 2 + r, q, CASE WHEN r = 2 THEN NULL ELSE md5('user-' || (1 + q % n_users))::uuid END,
         r, jsonb_build_object('op', 'edit', 'rev', r, 'fields', jsonb_build_array('title')),
         CASE WHEN r = 1 THEN NULL ELSE E'second pass\nwith notes' END,
         timestamptz '2026-01-15' + q * interval '1 minute'
  FROM generate_series(1, n_q) q, generate_series(1, 2) r
  WHERE r = 1 OR q % 3 = 0;

  -- Activity.
  INSERT INTO public.question_attempts (id, user_id, question_id, answer_id, is_correct, duration,
      attempted_at, client_info) OVERRIDING SYSTEM VALUE
  SELECT k, u.id, q, CASE WHEN k % 6 = 0 THEN NULL ELSE (q - 1) * 4 + 1 + k % 4 END, k % 4 = 0,
         make_interval(secs => 5 + k % 90), timestamptz '2026-04-01' + k * interval '17 seconds',
         CASE WHEN k % 5 = 0 THEN NULL ELSE jsonb_build_object('ua', 'web', 'v', k % 3) END
  FROM generate_series(1, 10 * n_q) k
  CROSS JOIN LATERAL (SELECT 1 + (k * 7) % n_q AS q) qq
  CROSS JOIN LATERAL (SELECT CASE WHEN n_extra > 0 AND k % 10 = 0
                                  THEN md5('prod-user-' || (1 + k % n_extra))::uuid
                                  ELSE md5('user-' || (1 + k % n_users))::uuid END AS id) u;

  INSERT INTO public.user_question_progress (user_id, question_id, attempts, correct, ease_factor,
      next_review, last_attempt_at)
  SELECT md5('user-' || u)::uuid, 1 + (u * 31 + j) % n_q, 1 + j % 5, j % 3, 1.3 + (j % 10) / 4.0,
         date '2026-05-01' + (u + j) % 60, timestamptz '2026-04-01' + (u * j) * interval '1 minute'
  FROM generate_series(1, n_users) u, generate_series(1, 25) j;

  INSERT INTO public.user_topic_progress (user_id, topic_id, mastery, updated_at)
  SELECT md5('user-' || u)::uuid, 1 + (u * 17 + j) % n_topics, ((u + j) % 101)::numeric,
         timestamptz '2026-04-01'
  FROM generate_series(1, n_users) u, generate_series(1, 10) j;

  INSERT INTO public.playlists (id, owner_id, title, description, is_public, tags, cover, created_at)
  SELECT md5(salt || '-playlist-' || i)::uuid, md5('user-' || (1 + i % n_users))::uuid,
         'Playlist ' || i, CASE WHEN i % 3 = 0 THEN NULL ELSE E'Mixed\tset #' || i END, i % 2 = 0,
         CASE WHEN i % 4 = 0 THEN NULL ELSE ARRAY['review', 'week ' || i % 7] END,
         CASE WHEN i % 5 = 0 THEN decode(md5('cover' || i), 'hex') END,
         timestamptz '2026-02-01' + i * interval '1 hour'
  FROM generate_series(1, n_pl) i;

  INSERT INTO public.playlist_items (playlist_id, position, question_id, added_at)
  SELECT md5(salt || '-playlist-' || i)::uuid, p, 1 + (i * 10 + p) % n_q, timestamptz '2026-02-02'
  FROM generate_series(1, n_pl) i, generate_series(1, 10) p;

  INSERT INTO public.user_playlist_progress (user_id, playlist_id, last_position, completed_at)
  SELECT md5('user-' || u)::uuid, md5(salt || '-playlist-' || (1 + (u * 3) % n_pl))::uuid,
         CASE WHEN u % 4 = 0 THEN NULL ELSE 1 + u % 10 END,
         CASE WHEN u % 6 = 0 THEN timestamptz '2026-04-15' END
  FROM generate_series(1, n_users) u;

  -- Sequences follow the explicit ids.
  PERFORM setval(pg_get_serial_sequence('public.categories', 'id'), (SELECT max(id) FROM public.categories));
  PERFORM setval(pg_get_serial_sequence('public.subcategories', 'id'), (SELECT max(id) FROM public.subcategories));
  PERFORM setval(pg_get_serial_sequence('public.topics', 'id'), (SELECT max(id) FROM public.topics));
  PERFORM setval(pg_get_serial_sequence('public.questions', 'id'), (SELECT max(id) FROM public.questions));
  PERFORM setval(pg_get_serial_sequence('public.answers', 'id'), (SELECT max(id) FROM public.answers));
  PERFORM setval(pg_get_serial_sequence('public.content_revisions', 'id'), (SELECT max(id) FROM public.content_revisions));
  PERFORM setval(pg_get_serial_sequence('public.question_attempts', 'id'), (SELECT max(id) FROM public.question_attempts));
END
$$;
