-- After every snapshot row is in: give each question back the status it has in the
-- snapshot. Questions were inserted as drafts ([apply] insert_as in snapshot.toml) because
-- the guardrail refuses a published question before its topic links exist; now the links
-- are there, so publishing passes the guardrail.
--
-- Nothing to do for an app, or a scope, without public.questions and its status column.
DO $$
BEGIN
  IF to_regclass('pg_temp.snapshot_questions') IS NULL OR NOT EXISTS (
       SELECT 1 FROM pg_attribute
       WHERE attrelid = to_regclass('public.questions') AND attname = 'status'
         AND NOT attisdropped) THEN
    RETURN;
  END IF;
  UPDATE public.questions AS q
  SET status = s.status
  FROM pg_temp.snapshot_questions AS s
  WHERE q.id = s.id AND q.status IS DISTINCT FROM s.status;
END
$$;
