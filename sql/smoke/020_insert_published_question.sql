-- A question may not be inserted as published before its topic links exist.
-- expect-error: without topic links
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.subcategories) THEN
    RAISE EXCEPTION 'skip: no subcategory to file a test question under';
  END IF;
  INSERT INTO public.questions (subcategory_id, status, title, body)
  VALUES ((SELECT min(id) FROM public.subcategories), 'published', 'snapshot smoke test', 'must be refused');
END
$$;
