-- Publish guardrails: a published question always has at least one topic link.
--  * a question may not be inserted or updated to 'published' without topic links;
--  * a topic link may not be removed from a published question.
-- Plain (not deferred) triggers: why apply drafts questions before it touches the links.
SET ROLE app_owner;

CREATE FUNCTION public.guard_publish_requires_topics() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status = 'published' AND NOT EXISTS (
      SELECT 1 FROM public.question_topics WHERE question_id = NEW.id) THEN
    RAISE EXCEPTION 'guardrail: question % cannot be published without topic links', NEW.id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER questions_publish_guardrail
    BEFORE INSERT OR UPDATE OF status ON public.questions
    FOR EACH ROW EXECUTE FUNCTION public.guard_publish_requires_topics();

CREATE FUNCTION public.guard_published_topic_unlink() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM public.questions WHERE id = OLD.question_id AND status = 'published') THEN
    RAISE EXCEPTION 'guardrail: cannot unlink topic % from published question %',
      OLD.topic_id, OLD.question_id USING ERRCODE = 'check_violation';
  END IF;
  RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER question_topics_unlink_guardrail
    BEFORE DELETE OR UPDATE ON public.question_topics
    FOR EACH ROW EXECUTE FUNCTION public.guard_published_topic_unlink();

RESET ROLE;
