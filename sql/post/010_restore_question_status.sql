-- After every snapshot row is in: give each question back the status it has in the
-- snapshot. Questions were inserted as drafts ([apply] insert_as in snapshot.toml) because
-- the guardrail refuses a published question before its topic links exist; now the links
-- are there, so publishing passes the guardrail.
UPDATE public.questions AS q
SET status = s.status
FROM pg_temp.snapshot_questions AS s
WHERE q.id = s.id AND q.status IS DISTINCT FROM s.status;
