-- A topic link may not be removed from a published question.
-- expect-error: cannot unlink topic
DO $$
DECLARE q bigint; t integer;
BEGIN
  SELECT qt.question_id, qt.topic_id INTO q, t
  FROM public.question_topics qt JOIN public.questions p ON p.id = qt.question_id
  WHERE p.status = 'published' LIMIT 1;
  IF q IS NULL THEN
    RAISE EXCEPTION 'skip: no published question with topic links to try';
  END IF;
  DELETE FROM public.question_topics WHERE question_id = q AND topic_id = t;
END
$$;
