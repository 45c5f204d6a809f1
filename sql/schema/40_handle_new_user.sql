-- Supabase's documented pattern: every new auth user gets a public.users row.
-- A plain INSERT without ON CONFLICT, exactly as the docs show it.
SET ROLE app_owner;

CREATE FUNCTION public.handle_new_user() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
  INSERT INTO public.users (id, email, display_name)
  VALUES (NEW.id, NEW.email, coalesce(NEW.raw_user_meta_data ->> 'display_name', ''));
  RETURN NEW;
END
$$;

CREATE TRIGGER on_auth_user_created
    AFTER INSERT ON auth.users
    FOR EACH ROW EXECUTE FUNCTION public.handle_new_user();

RESET ROLE;
