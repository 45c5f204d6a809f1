-- Roles as Supabase has them. They are cluster-wide: a server may already hold them, made
-- by an earlier run or another tool with other attributes, so each is created when missing
-- and otherwise corrected to what the app (and the tests) rely on.
--   app_owner            plays Supabase's `postgres` role: NOSUPERUSER, BYPASSRLS, owns the
--                        public tables, may read and write auth.users/auth.identities but
--                        does not own them (so it may not DISABLE TRIGGER there): no member
--                        of supabase_auth_admin, no role-wide settings of its own.
--   supabase_auth_admin  owns the auth schema.
--   anon, authenticated  the API roles the RLS policies name.
-- Like Supabase's `postgres` (supautils allows it), app_owner may SET
-- session_replication_role: on PostgreSQL 15 and later that takes GRANT SET ON PARAMETER.
-- Each ALTER runs only when something differs, so concurrent runs do not race on the roles.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_owner') THEN
    CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE BYPASSRLS;
  ELSIF NOT EXISTS (
    SELECT FROM pg_roles WHERE rolname = 'app_owner'
      AND rolcanlogin AND NOT rolsuper AND NOT rolcreaterole AND rolbypassrls
  ) THEN
    ALTER ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE BYPASSRLS;
  END IF;
  IF EXISTS (
    SELECT FROM pg_db_role_setting
    WHERE setdatabase = 0 AND setrole = (SELECT oid FROM pg_roles WHERE rolname = 'app_owner')
  ) THEN
    ALTER ROLE app_owner RESET ALL;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_auth_admin') THEN
    CREATE ROLE supabase_auth_admin NOLOGIN NOSUPERUSER;
  ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_auth_admin' AND rolsuper) THEN
    ALTER ROLE supabase_auth_admin NOSUPERUSER;
  END IF;
  IF EXISTS (
    SELECT FROM pg_auth_members
    WHERE roleid = (SELECT oid FROM pg_roles WHERE rolname = 'supabase_auth_admin')
      AND member = (SELECT oid FROM pg_roles WHERE rolname = 'app_owner')
  ) THEN
    REVOKE supabase_auth_admin FROM app_owner;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN;
  ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon' AND (rolsuper OR rolbypassrls)) THEN
    ALTER ROLE anon NOSUPERUSER NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN;
  ELSIF EXISTS (
    SELECT FROM pg_roles WHERE rolname = 'authenticated' AND (rolsuper OR rolbypassrls)
  ) THEN
    ALTER ROLE authenticated NOSUPERUSER NOBYPASSRLS;
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
