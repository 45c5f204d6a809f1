-- A question may not be inserted as published before its topic links exist.
-- requires: public.questions(status)
-- expect-error: without topic links
DO $$
DECLARE
  q regclass := to_regclass('public.questions');
  needed text;
  blocked text;
  status_type text;
  made tid;
BEGIN
  SELECT format_type(atttypid, atttypmod) INTO status_type FROM pg_attribute
  WHERE attrelid = q AND attname = 'status' AND NOT attisdropped;
  IF q IS NULL OR status_type IS NULL THEN
    RAISE EXCEPTION 'skip: needs public.questions(status), absent here';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM public.questions) THEN
    RAISE EXCEPTION 'skip: no question to model a test question on';
  END IF;
  -- The test row gets its key from its default and every other required column from an
  -- existing question, whatever this app's columns and key types are.
  SELECT string_agg(DISTINCT a.attname, ', ') INTO blocked
  FROM pg_attribute a JOIN pg_index i ON i.indrelid = q AND a.attnum = ANY (i.indkey)
  WHERE a.attrelid = q AND i.indisunique AND NOT a.atthasdef AND a.attidentity = ''
    AND a.attgenerated = '';
  IF blocked IS NOT NULL THEN
    RAISE EXCEPTION 'skip: public.questions has unique columns without a default (%): no test question can be made', blocked;
  END IF;
  SELECT string_agg(quote_ident(a.attname), ', ') INTO needed
  FROM pg_attribute a
  WHERE a.attrelid = q AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
    AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = '' AND a.attname <> 'status';
  EXECUTE format(
    'INSERT INTO public.questions (%s status) SELECT %s %L::%s FROM public.questions LIMIT 1 '
    'RETURNING ctid', coalesce(needed || ', ', ''), coalesce(needed || ', ', ''), 'published',
    status_type)
  INTO made;
END
$$;
