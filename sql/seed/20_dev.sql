-- The dev dataset. Size it with `SET seed.scale = N` before running this file (default 1).
SET client_min_messages = warning;
DO $$ BEGIN
  PERFORM seed.generate('dev', coalesce(nullif(current_setting('seed.scale', true), '')::integer, 1));
END $$;
DROP SCHEMA seed CASCADE;
