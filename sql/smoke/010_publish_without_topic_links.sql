-- A question may not be published while it has no topic links.
-- expect-error: without topic links
DO $$
DECLARE q bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM public.subcategories) THEN
    RAISE EXCEPTION 'skip: no subcategory to file a test question under';
  END IF;
  INSERT INTO public.questions (subcategory_id, status, title, body)
  VALUES ((SELECT min(id) FROM public.subcategories), 'draft', 'snapshot smoke test', 'must not publish')
  RETURNING id INTO q;
  UPDATE public.questions SET status = 'published' WHERE id = q;
END
$$;
