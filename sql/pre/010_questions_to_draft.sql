-- Before any row is deleted: drop to draft the target questions whose topic links this
-- apply deletes or rewrites. The publish guardrail refuses to unlink a topic from a
-- published question; as drafts, their links can go with every trigger still on. The
-- post-script gives each question its snapshot status back.
--
-- A delta apply touches few links: only the questions whose links the snapshot lacks (or
-- holds otherwise) are drafted, and none when the apply writes no link at all
-- (snapshot.unchanged lists public.question_topics). When public.question_topics is
-- replaced in full (snapshot.full_replace lists it), or the scope does not stage it, every
-- question is.
--
-- Nothing to do for an app, or a scope, without public.questions and its status column:
-- the script then returns at once (the post-script does the same).
DO $$
BEGIN
  IF to_regclass('pg_temp.snapshot_questions') IS NULL OR NOT EXISTS (
       SELECT 1 FROM pg_attribute
       WHERE attrelid = to_regclass('public.questions') AND attname = 'status'
         AND NOT attisdropped) THEN
    RETURN;
  ELSIF 'public.question_topics' = ANY (
       coalesce(nullif(current_setting('snapshot.unchanged', true), ''), '{}')::text[]) THEN
    RETURN;
  ELSIF to_regclass('pg_temp.snapshot_question_topics') IS NULL
     OR 'public.question_topics' = ANY (
          coalesce(nullif(current_setting('snapshot.full_replace', true), ''), '{}')::text[]) THEN
    UPDATE public.questions SET status = 'draft' WHERE status <> 'draft';
  ELSE
    UPDATE public.questions AS q SET status = 'draft'
    WHERE q.status <> 'draft' AND EXISTS (
      SELECT 1 FROM public.question_topics AS t
      WHERE t.question_id = q.id AND NOT EXISTS (
        SELECT 1 FROM pg_temp.snapshot_question_topics AS s WHERE to_jsonb(s) = to_jsonb(t)));
  END IF;
END
$$;
