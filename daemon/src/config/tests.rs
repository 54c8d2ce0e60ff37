use super::*;

#[test]
fn the_printed_template_is_the_defaults_and_overrides_only_what_a_file_names() {
    let d = Config::default();
    assert_eq!(parse("").unwrap(), d);
    let c = parse("[opener]\nmax_words = 6\n").unwrap();
    assert_eq!(c.opener.max_words, 6);
    assert_eq!(Config { opener: OpenerSection { max_words: 8, ..c.opener.clone() }, ..c }, d);
    assert_eq!(d.engine.cpu_affinity, Affinity::Auto);
    assert_eq!(d.grpc.unix_socket_mode, FileMode(0o660));
    assert_eq!(d.log.format, LogFormat::Text);
    assert!(warnings(&d).is_empty(), "the defaults stay on loopback");
}

#[test]
fn every_problem_is_listed_with_its_key() {
    let text = r#"
        colour = "blue"
        [model]
        threads = 999
        typo_key = 1
        [engine]
        cpu_affinity = "fast ones"
        workers = "two"
        [opener]
        min_words = 9
        max_words = 3
        [cloud]
        enabled = true
        base_url = "ftp://x"
        recovery = "sarcasm"
        [cloud.headers]
        Authorization = "Bearer sk-123"
        [grpc]
        unix_socket_mode = "999"
        [log]
        format = "xml"
    "#;
    let problems = parse(text).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for want in [
        "colour",
        "model.typo_key",
        "model.threads",
        "engine.cpu_affinity",
        "engine.workers",
        "opener.min_words",
        "cloud.base_url",
        "cloud.recovery",
        "cloud.headers",
        "grpc.unix_socket_mode",
        "log.format",
    ] {
        assert!(keys.contains(&want), "{want} missing from {problems:?}");
    }
    let says = |key: &str, what: &str| problems.iter().any(|p| p.key == key && p.message.contains(what));
    assert!(says("cloud.recovery", "sarcasm"), "{problems:?}");
    assert!(says("engine.cpu_affinity", "CPU list"), "{problems:?}");
    assert!(says("grpc.unix_socket_mode", "octal"), "{problems:?}");
    assert!(says("cloud.headers", "api_key_file"), "{problems:?}");
    assert!(!problems.iter().any(|p| p.to_string().contains("sk-123")), "a key must never be echoed");
}

#[test]
fn header_values_that_cannot_be_sent_are_refused() {
    let p = parse("[cloud.headers]\nX-Org = \"home\\r\\nX-Evil: 1\"\n").unwrap_err();
    assert_eq!(p[0].key, "cloud.headers.X-Org");
    assert!(p[0].message.contains("control character"), "{p:?}");
    assert!(parse("[cloud.headers]\nX-Org = \"home\tlab\"\n").is_ok());
}

#[test]
fn the_packaged_config_differs_from_the_defaults_only_where_a_board_needs_it() {
    let packaged = parse(include_str!("../../../packaging/mulmd.toml")).unwrap();
    let mut expected = Config::default();
    expected.model.dir = "/var/lib/mulmd/models/default".into();
    expected.model.threads = 0;
    expected.grpc.unix_socket = "/run/mulmd/api.sock".into();
    assert_eq!(packaged, expected);
}

#[test]
fn broken_toml_is_reported_as_such() {
    let p = parse("[model\nthreads = ").unwrap_err();
    assert_eq!(p[0].key, "(file)");
    assert!(p[0].message.contains("TOML"));
}

#[test]
fn named_files_and_the_model_directory_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let text = format!(
        "[model]\ndir = {m:?}\n[cloud]\nenabled = true\napi_key_file = {m:?}\n[mqtt]\nenabled = true\npassword_file = {m:?}\n",
        m = missing.display().to_string()
    );
    let c = parse(&text).unwrap();
    let keys: Vec<String> = check_files(&c).into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["model.dir", "cloud.api_key_file", "mqtt.password_file"]);
    let mut c = Config::default();
    c.model.dir = dir.path().to_path_buf();
    assert!(check_files(&c).is_empty());
}

#[test]
fn a_listener_beyond_loopback_needs_a_token_or_an_explicit_allowance() {
    let c = parse("[grpc]\nlisten = \"0.0.0.0:50051\"\n[metrics]\nlisten = \"[::1]:9464\"\n[http]\nenabled = true\nlisten = \"192.168.1.5:11434\"\n").unwrap();
    let (problems, warnings) = exposure(&c, false);
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["grpc.listen", "http.listen"], "metrics on [::1] is loopback");
    assert!(warnings.is_empty());
    let m = &problems[0].message;
    assert!(m.contains("auth.tokens_file") && m.contains("127.0.0.1") && m.contains("allow_unauthenticated_lan"), "{m}");
    assert_eq!(exposure(&c, true), (vec![], vec![]), "tokens guard every TCP listener");
    let allowed = Config { auth: AuthSection { allow_unauthenticated_lan: true, ..c.auth.clone() }, ..c };
    let (problems, warnings) = exposure(&allowed, false);
    assert!(problems.is_empty() && warnings.len() == 2, "{problems:?} {warnings:?}");
}

#[test]
fn a_key_that_moved_says_where_to() {
    let problems = parse("[http]\ntokens_file = \"/etc/mulmd/tokens\"\n").unwrap_err();
    assert_eq!(problems[0].key, "http.tokens_file");
    assert!(problems[0].message.contains("auth.tokens_file"), "{problems:?}");
}

proptest::proptest! {
    #[test]
    fn any_text_is_a_config_or_a_list_of_problems(text in "\\PC{0,300}") {
        if let Err(problems) = parse(&text) {
            proptest::prop_assert!(!problems.is_empty());
        }
    }

    #[test]
    fn any_value_for_any_key_is_taken_or_named(section in "(model|engine|opener|conversation|cloud|grpc|http|mqtt|metrics|auth|discovery|tls|log)", key in "[a-z_]{1,24}", value in "(\"[^\"\\\\\\p{Cc}]{0,12}\"|-?[0-9]{1,22}|true|false|\\[\\]|[0-9]\\.[0-9])") {
        let text = format!("[{section}]\n{key} = {value}\n");
        if let Err(problems) = parse(&text) {
            // Either the value is not TOML at all, or the problem names its key.
            let named = problems.iter().all(|p| p.key == "(file)" || p.key.starts_with(&section));
            proptest::prop_assert!(named, "{text} gave {problems:?}");
        }
    }
}

#[test]
fn the_prompt_cache_is_on_by_default_and_bounded() {
    assert_eq!(Config::default().engine.prefix_cache_mb, 128);
    assert_eq!(parse("[engine]\nprefix_cache_mb = 0\n").unwrap().engine.prefix_cache_mb, 0, "0 turns it off");
    let problems = parse("[engine]\nprefix_cache_mb = 100000\n").unwrap_err();
    assert!(problems.iter().any(|p| p.key == "engine.prefix_cache_mb" && p.message.contains("0..=65536")), "{problems:?}");
}

#[test]
fn the_plan_cache_is_on_by_default_and_can_be_moved_or_turned_off() {
    let model = Config::default().model;
    assert_eq!((model.plan_cache.as_str(), model.plan_cache_mb), ("", 2048));
    assert_eq!(parse("[model]\nplan_cache = \"off\"\n").unwrap().model.plan_cache(), crate::engine::PlanCache::off());
    let moved = parse("[model]\nplan_cache = \"/srv/plans\"\nplan_cache_mb = 300\n").unwrap().model.plan_cache();
    assert_eq!(moved, crate::engine::PlanCache::at("/srv/plans".into(), 300));
    assert_eq!(parse("[model]\nplan_cache_mb = 0\n").unwrap().model.plan_cache(), crate::engine::PlanCache::off(), "0 keeps none");
    let problems = parse("[model]\nplan_cache = \"plans\"\n").unwrap_err();
    assert!(problems.iter().any(|p| p.key == "model.plan_cache" && p.message.contains("absolute")), "{problems:?}");
    let problems = parse("[model]\nplan_cache_mb = 9999999\n").unwrap_err();
    assert!(problems.iter().any(|p| p.key == "model.plan_cache_mb"), "{problems:?}");
}
