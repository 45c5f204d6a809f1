-- A topic link may not be removed from a published question.
-- requires: public.questions(status), public.question_topics(question_id)
-- expect-error: cannot unlink topic
DO $$
DECLARE link tid;
BEGIN
  IF to_regclass('public.question_topics') IS NULL
     OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('public.questions')
                    AND attname = 'status' AND NOT attisdropped) THEN
    RAISE EXCEPTION 'skip: needs public.questions(status) and public.question_topics, absent here';
  END IF;
  -- by ctid: whatever the key types (bigint, uuid...)
  SELECT qt.ctid INTO link
  FROM public.question_topics qt JOIN public.questions p ON p.id = qt.question_id
  WHERE p.status::text = 'published' LIMIT 1;
  IF link IS NULL THEN
    RAISE EXCEPTION 'skip: no published question with topic links to try';
  END IF;
  DELETE FROM public.question_topics WHERE ctid = link;
END
$$;
