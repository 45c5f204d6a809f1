-- Roles as Supabase has them (cluster-wide, so created only when missing).
--   app_owner            plays Supabase's `postgres` role: NOSUPERUSER, BYPASSRLS, owns the
--                        public tables, may read and write auth.users/auth.identities but
--                        does not own them (so it may not DISABLE TRIGGER there).
--   supabase_auth_admin  owns the auth schema.
--   anon, authenticated  the API roles the RLS policies name.
-- Like Supabase's `postgres` (supautils allows it), app_owner may SET
-- session_replication_role: on PostgreSQL 15 and later that takes GRANT SET ON PARAMETER.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_owner') THEN
    CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE BYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_auth_admin') THEN
    CREATE ROLE supabase_auth_admin NOLOGIN NOSUPERUSER;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN;
  END IF;
END
$$;
DO $$
BEGIN
  IF current_setting('server_version_num')::int >= 150000 THEN
    EXECUTE 'GRANT SET ON PARAMETER session_replication_role TO app_owner';
  END IF;
END
$$;
