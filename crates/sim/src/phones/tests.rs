//! The phone simulator over real connections: a fleet bound to 0.0.0.0:0, reached at 127.0.0.x.
//! The pure rules are tested in `model`.

use super::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

/// Guards every wait so that a bug fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(10);
const AUTH: &str = "Basic UG9seWNvbTo0NTY="; // Polycom:456

async fn fleet(count: usize, base: [u8; 4], tweak: impl FnOnce(&mut PhonesOptions)) -> Phones {
    let mut opts = PhonesOptions::new(count, Ipv4Addr::from(base));
    tweak(&mut opts);
    start(opts, CancellationToken::new()).await.unwrap()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One request on an open HTTP/1 connection.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Answer> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "phone");
    if let Some(a) = auth {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let bytes = match body {
        Some(v) => {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(bytes))?).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request on a fresh plain-HTTP connection.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Answer> {
    tokio::time::timeout(GUARD, async {
        let mut sender = connect(addr).await?;
        send(&mut sender, method, path, auth, body).await
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {addr}{path}"))?
}

/// An authenticated device-API call that must get an HTTP answer: status and JSON body.
async fn api(
    phones: &Phones,
    idx: usize,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let a = call(phones.addr(idx), method, path, Some(AUTH), body)
        .await
        .unwrap();
    (a.status, a.json())
}

async fn sim_post(phones: &Phones, idx: usize, path: &str, body: Value) -> Value {
    let a = call(phones.addr(idx), "POST", path, None, Some(body))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{path}: {:?}", a.body);
    a.json()
}

async fn sim_state(phones: &Phones, idx: usize) -> Value {
    let a = call(phones.addr(idx), "GET", "/sim/state", None, None)
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    a.json()
}

fn ok() -> (u16, Value) {
    (200, json!({"Status": "2000"}))
}

fn status(s: &str) -> (u16, Value) {
    (200, json!({"Status": s}))
}

#[tokio::test]
async fn auth_envelope_and_status_endpoints() {
    let phones = fleet(2, [127, 0, 1, 10], |_| {}).await;
    let addr = phones.addr(0);

    for auth in [None, Some("Basic UG9seWNvbTo0NTc="), Some("Bearer x")] {
        let a = call(addr, "GET", "/api/v1/mgmt/device/info", auth, None)
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{auth:?}");
        assert_eq!(
            a.headers["www-authenticate"],
            "Basic realm=\"SPIP Configuration\""
        );
    }
    let a = call(addr, "GET", "/api/v1/mgmt/device/info", Some(AUTH), None)
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["server"], "Polycom SoundPoint IP Telephone HTTPd");
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    assert_eq!(v["Status"], "2000");
    let d = &v["data"];
    assert_eq!(d["ModelNumber"], "VVX 411");
    assert_eq!(d["FirmwareRelease"], "5.9.6.2327");
    assert_eq!(d["MACAddress"], "0004f2000000");
    assert_eq!(d["IPV4Address"], "127.0.1.10");
    assert_eq!(d["IPV6Address"], "::");
    assert_eq!(d["DeviceType"], "hardwareEndpoint");
    assert_eq!(d["AttachedHardware"], json!({"EM": []}));
    let up = d["UpTimeSinceLastReboot"].as_str().unwrap();
    let (days, clock) = up.split_once(" Day ").unwrap();
    assert!(
        days.parse::<u64>().is_ok() && clock.split(':').count() == 3,
        "{up}"
    );
    assert!(d.get("Firmware").is_none());

    // Odd phones answer the newer form.
    let (s, v) = api(&phones, 1, "GET", "/api/v1/mgmt/device/info", None).await;
    assert_eq!(s, 200);
    let d = &v["data"];
    assert_eq!(d["ModelNumber"], "VVX 450");
    assert_eq!(d["MACAddress"], "0004f2000001");
    assert_eq!(d["Firmware"]["Application"], "6.4.7.4560");
    assert!(d["UpTime"]["Hours"].is_string() && d["UpTime"]["Days"].is_string());
    assert!(d.get("FirmwareRelease").is_none() && d.get("UpTimeSinceLastReboot").is_none());

    let (s, v) = api(&phones, 1, "GET", "/api/v1/mgmt/lineInfo", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["data"][0],
        json!({"LineNumber": "1", "RegistrationStatus": "Registered", "Label": "1001",
               "LineType": "private", "SIPAddress": "sip:1001@pbx.sim", "UserID": "1001",
               "Protocol": "SIP", "ProxyAddress": "pbx.sim", "Port": "5060"})
    );
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    assert_eq!(
        api(&phones, 0, "GET", "/api/v1/webCallControl/callStatus", None).await,
        status("4007")
    );
    let (_, v) = api(&phones, 0, "GET", "/api/v1/mgmt/pollForStatus", None).await;
    assert_eq!(v["data"]["State"], "Idle");

    // Unknown paths and wrong methods; the test API needs no credentials.
    assert_eq!(
        api(&phones, 0, "GET", "/api/v1/mgmt/nothing", None).await.0,
        404
    );
    assert_eq!(api(&phones, 0, "GET", "/index.html", None).await.0, 404);
    assert_eq!(
        api(&phones, 0, "GET", "/api/v1/mgmt/safeReboot", None)
            .await
            .0,
        405
    );
    let s = sim_state(&phones, 1).await;
    assert_eq!(
        (
            s["mac"].as_str(),
            s["model"].as_str(),
            s["call_state"].as_str()
        ),
        (Some("0004f2000001"), Some("VVX 450"), Some("idle"))
    );
    assert!(s["uptime_s"].as_u64().unwrap() > 3600);
    assert_eq!(s["params"]["apps.restapi.enabled"], "1");
    assert_eq!(s["lines"][1]["uri"], "sip:101001@pbx.sim");
    assert_eq!(phones.state(1).mac, "0004f2000001");
    assert!(phones.stats().auth_failures >= 3);
    phones.shutdown().await;
}

#[tokio::test]
async fn a_second_request_while_one_runs_gets_403() {
    let phones = fleet(2, [127, 0, 1, 20], |_| {}).await;
    phones.set_fault(
        0,
        Fault {
            mode: FaultMode::Slow,
            delay_ms: 600,
        },
    );
    let addr = phones.addr(0);
    let first =
        tokio::spawn(
            async move { call(addr, "GET", "/api/v1/mgmt/lineInfo", Some(AUTH), None).await },
        );
    // Wait until the first request holds the phone.
    let deadline = Instant::now() + GUARD;
    while !phones.state(0).busy {
        assert!(Instant::now() < deadline, "first request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = call(addr, "GET", "/api/v1/mgmt/device/info", Some(AUTH), None)
        .await
        .unwrap();
    assert_eq!((a.status, a.json()), (403, json!({"Status": "4403"})));
    // Other phones and the test API are not held up.
    assert_eq!(
        api(&phones, 1, "GET", "/api/v1/mgmt/lineInfo", None)
            .await
            .0,
        200
    );
    assert_eq!(sim_state(&phones, 0).await["busy"], true);
    let a = first.await.unwrap().unwrap();
    assert_eq!(a.status, 200);
    assert!(!phones.state(0).busy);
    assert_eq!(phones.stats().busy_refusals, 1);
    phones.shutdown().await;
}

#[tokio::test]
async fn reboot_takes_the_phone_down_and_restarts_uptime() {
    let phones = fleet(1, [127, 0, 1, 30], |o| {
        o.reboot_time = Duration::from_millis(700)
    })
    .await;
    let addr = phones.addr(0);
    assert!(phones.state(0).uptime_s >= 3600);
    assert_eq!(
        api(
            &phones,
            0,
            "POST",
            "/api/v1/callctrl/dial",
            Some(json!({"data": {"Dest": "42"}}))
        )
        .await,
        ok()
    );
    // A keep-alive connection opened before the reboot is reset with it.
    let mut kept = connect(addr).await.unwrap();
    assert_eq!(
        send(&mut kept, "GET", "/sim/state", None, None)
            .await
            .unwrap()
            .status,
        200
    );

    let (s, v) = api(&phones, 0, "POST", "/api/v1/mgmt/safeReboot", None).await;
    assert_eq!((s, v), ok());
    assert!(phones.is_down(0));
    // While down, every connection is reset, the test API included.
    let e = call(addr, "GET", "/sim/state", None, None).await;
    assert!(e.is_err(), "answered while rebooting");
    tokio::time::sleep(ACK_GRACE * 3).await;
    assert!(
        send(&mut kept, "GET", "/sim/state", None, None)
            .await
            .is_err()
    );

    let deadline = Instant::now() + GUARD;
    while phones.is_down(0) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = sim_state(&phones, 0).await;
    assert_eq!(
        (s["reboots"].as_u64(), s["call_state"].as_str()),
        (Some(1), Some("idle"))
    );
    assert!(s["uptime_s"].as_u64().unwrap() < 5, "{s}");
    let (_, v) = api(&phones, 0, "GET", "/api/v1/mgmt/device/info", None).await;
    assert!(
        v["data"]["UpTimeSinceLastReboot"]
            .as_str()
            .unwrap()
            .starts_with("0 Day 0:00:0")
    );

    // safeRestart does the same.
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/safeRestart", None).await,
        ok()
    );
    assert_eq!(phones.state(0).reboots, 2);
    assert!(phones.stats().reset_connections >= 1);
    phones.shutdown().await;
}

#[tokio::test]
async fn dial_end_call_and_line_registration() {
    let phones = fleet(1, [127, 0, 1, 40], |_| {}).await;
    let dial = |body: Value| {
        let phones = &phones;
        async move { api(phones, 0, "POST", "/api/v1/callctrl/dial", Some(body)).await }
    };
    assert_eq!(
        dial(json!({"data": {"Dest": "", "Line": "1"}})).await,
        status("4000")
    );
    assert_eq!(dial(json!({"data": {"Line": "1"}})).await, status("4000"));
    assert_eq!(
        dial(json!({"data": {"Dest": "1234", "Type": "FAX"}})).await,
        status("4000")
    );
    assert_eq!(dial(json!({"nodata": 1})).await, status("4000"));
    assert_eq!(
        dial(json!({"data": {"Dest": "1234", "Line": "3"}})).await,
        status("4005")
    );
    assert_eq!(
        dial(json!({"data": {"Dest": "1234", "Line": "1", "Type": "SIP"}})).await,
        ok()
    );
    assert_eq!(
        dial(json!({"data": {"Dest": "999", "Line": "2"}})).await,
        status("4001")
    );

    let (_, v) = api(&phones, 0, "GET", "/api/v1/webCallControl/callStatus", None).await;
    let d = &v["data"];
    assert_eq!(
        (
            d["CallState"].as_str(),
            d["RemotePartyNumber"].as_str(),
            d["LineId"].as_str()
        ),
        (Some("Connected"), Some("1234"), Some("1"))
    );
    assert_eq!(
        (d["Type"].as_str(), d["Protocol"].as_str()),
        (Some("Outgoing"), Some("SIP"))
    );
    let handle = d["CallHandle"].as_str().unwrap().to_owned();
    assert!(handle.starts_with("0x"));
    assert!(d["DurationInSeconds"].is_string());
    let (_, v) = api(&phones, 0, "GET", "/api/v1/mgmt/pollForStatus", None).await;
    assert_eq!(v["data"]["State"], "Active");
    assert_eq!(sim_state(&phones, 0).await["call_state"], "Connected");

    let end = |body: Value| {
        let phones = &phones;
        async move { api(phones, 0, "POST", "/api/v1/callctrl/endCall", Some(body)).await }
    };
    assert_eq!(end(json!({"data": {"Ref": "0x1"}})).await, status("4007"));
    assert_eq!(end(json!({"data": {"Ref": handle}})).await, ok());
    assert_eq!(end(json!({"data": {"Ref": handle}})).await, status("4007"));
    assert_eq!(phones.state(0).call_state, "idle");

    // Line 2 unregistered through the test API: dialling on it fails, lineInfo shows it.
    let v = sim_post(
        &phones,
        0,
        "/sim/lines",
        json!({"line": 2, "registered": false}),
    )
    .await;
    assert_eq!(v["lines"][1]["registered"], false);
    assert_eq!(
        dial(json!({"data": {"Dest": "5", "Line": 2}})).await,
        status("4002")
    );
    let (_, v) = api(&phones, 0, "GET", "/api/v1/mgmt/lineInfo", None).await;
    assert_eq!(v["data"][1]["RegistrationStatus"], "Unregistered");
    let a = call(
        phones.addr(0),
        "POST",
        "/sim/lines",
        None,
        Some(json!({"line": 9, "registered": true})),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 400);
    phones.set_line_registered(0, 2, true).unwrap();
    assert!(phones.set_line_registered(0, 3, true).is_err());
    assert_eq!(dial(json!({"data": {"Dest": "5", "Line": 2}})).await, ok());
    phones.shutdown().await;
}

#[tokio::test]
async fn config_get_set_and_the_api_switch() {
    let phones = fleet(1, [127, 0, 1, 50], |_| {}).await;
    let get = |names: Value| {
        let phones = &phones;
        async move {
            api(
                phones,
                0,
                "POST",
                "/api/v1/mgmt/config/get",
                Some(json!({"data": names})),
            )
            .await
        }
    };
    let (s, v) = get(json!([
        "reg.1.address",
        "up.screenCapture.enabled",
        "no.such.thing"
    ]))
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"Status": "2000", "data": {
            "reg.1.address": {"Value": "1000", "Source": "config_files"},
            "up.screenCapture.enabled": {"Value": "0", "Source": "default"},
        }})
    );
    let many: Vec<String> = (0..21).map(|i| format!("p.{i}")).collect();
    assert_eq!(get(json!(many)).await, status("4009"));
    assert_eq!(
        get(json!(many[..20])).await,
        (200, json!({"Status": "2000", "data": {}}))
    );
    assert_eq!(get(json!("reg.1.address")).await, status("4000"));
    assert_eq!(get(json!([1, 2])).await, status("4000"));

    let set = |data: Value| {
        let phones = &phones;
        async move {
            api(
                phones,
                0,
                "POST",
                "/api/v1/mgmt/config/set",
                Some(json!({"data": data})),
            )
            .await
        }
    };
    assert_eq!(set(json!({"reg.1.label": 5})).await, status("4000"));
    assert_eq!(set(json!(["x"])).await, status("4000"));
    assert_eq!(
        set(json!({"reg.1.label": "Reception", "feature.x": "1"})).await,
        ok()
    );
    let (_, v) = get(json!(["reg.1.label", "feature.x"])).await;
    assert_eq!(
        v["data"]["reg.1.label"],
        json!({"Value": "Reception", "Source": "local"})
    );
    assert_eq!(sim_state(&phones, 0).await["params"]["feature.x"], "1");

    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/updateConfiguration", None).await,
        ok()
    );
    assert_eq!(phones.state(0).config_updates, 1);

    // Turning the REST API off: every /api/ path is 404 from then on.
    assert_eq!(set(json!({"apps.restapi.enabled": "0"})).await, ok());
    assert_eq!(
        api(&phones, 0, "GET", "/api/v1/mgmt/device/info", None)
            .await
            .0,
        404
    );
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/factoryReset", None)
            .await
            .0,
        404
    );
    assert_eq!(
        sim_state(&phones, 0).await["params"]["apps.restapi.enabled"],
        "0"
    );
    // The web server still answers its other pages.
    assert_eq!(
        api(&phones, 0, "GET", "/captureScreen/mainScreen", None)
            .await
            .0,
        403
    );
    phones.shutdown().await;
}

#[tokio::test]
async fn resets_and_configuration_export() {
    let phones = fleet(1, [127, 0, 1, 60], |o| {
        o.reboot_time = Duration::from_millis(300)
    })
    .await;
    let export = |n: &str| {
        let addr = phones.addr(0);
        let path = format!("/Utilities/configuration/exportFile?source={n}");
        async move { call(addr, "GET", &path, Some(AUTH), None).await.unwrap() }
    };
    let a = export("0").await;
    assert_eq!(
        (a.status, &a.headers["content-type"]),
        (200, &"text/plain".parse::<HeaderValue>().unwrap())
    );
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    assert!(
        text.contains("<PHONE_CONFIG>") && text.contains("reg.1.address=\"1000\""),
        "{text}"
    );
    assert!(!text.contains("device.prov.serverName"));
    let text = String::from_utf8(export("3").await.body.to_vec()).unwrap();
    assert!(
        text.contains("device.prov.serverName=\"relay.sim\""),
        "{text}"
    );
    let text = String::from_utf8(export("4").await.body.to_vec()).unwrap();
    assert!(
        text.contains("device.prov.serverName=\"\"") && text.contains("reg.2.address=\"101000\""),
        "{text}"
    );
    for bad in ["5", "x", ""] {
        assert_eq!(export(bad).await.status, 400, "source={bad}");
    }
    let a = call(
        phones.addr(0),
        "GET",
        "/Utilities/configuration/exportFile?source=1",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 401);

    // Changes in three sources; each reset clears what it names.
    phones.set_param(0, Source::Web, "web.only", "w&\"<");
    phones.set_param(0, Source::Cloud, "cloud.only", "c");
    assert_eq!(
        api(
            &phones,
            0,
            "POST",
            "/api/v1/mgmt/config/set",
            Some(json!({"data": {"local.only": "l"}}))
        )
        .await,
        ok()
    );
    assert!(
        String::from_utf8(export("1").await.body.to_vec())
            .unwrap()
            .contains("local.only=\"l\"")
    );
    assert!(
        String::from_utf8(export("2").await.body.to_vec())
            .unwrap()
            .contains("web.only=\"w&amp;&quot;&lt;\"")
    );
    let v = sim_post(
        &phones,
        0,
        "/sim/params",
        json!({"source": "config_files", "params": {"cf.new": "1"}}),
    )
    .await;
    assert_eq!(v["set"], 1);
    assert!(
        String::from_utf8(export("0").await.body.to_vec())
            .unwrap()
            .contains("cf.new=\"1\"")
    );

    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/configReset/bogus", None).await,
        status("4000")
    );
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/configReset/cloud", None).await,
        ok()
    );
    let params = phones.state(0).params;
    assert!(!params.contains_key("cloud.only") && params.contains_key("web.only"));
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/configReset", None).await,
        ok()
    );
    let params = phones.state(0).params;
    assert!(!params.contains_key("web.only") && !params.contains_key("local.only"));
    assert_eq!(params["device.prov.serverName"], "");
    assert_eq!(params["cf.new"], "1", "config files are not touched");
    assert_eq!(phones.state(0).reboots, 0, "configReset does not reboot");

    // Factory reset: back to how the phone was made, after a reboot.
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/factoryReset", None).await,
        ok()
    );
    assert!(phones.is_down(0));
    let state = phones.state(0);
    assert_eq!(state.reboots, 1);
    assert!(!state.params.contains_key("cf.new"));
    assert_eq!(state.params["device.prov.serverName"], "relay.sim");
    assert_eq!(state.params["reg.1.address"], "1000");
    phones.shutdown().await;
}

#[tokio::test]
async fn screen_and_packet_capture() {
    let phones = fleet(1, [127, 0, 1, 70], |_| {}).await;
    let a = call(
        phones.addr(0),
        "GET",
        "/captureScreen/mainScreen",
        Some(AUTH),
        None,
    )
    .await
    .unwrap();
    assert_eq!((a.status, a.json()), (403, json!({"Status": "4003"})));
    assert_eq!(
        api(
            &phones,
            0,
            "POST",
            "/api/v1/mgmt/config/set",
            Some(json!({"data": {"up.screenCapture.enabled": "1"}}))
        )
        .await,
        ok()
    );
    let a = call(
        phones.addr(0),
        "GET",
        "/captureScreen/mainScreen",
        Some(AUTH),
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "image/bmp");
    assert_eq!(&a.body[..2], b"BM");
    assert_eq!(a.body.len(), 54 + 64 * 3 * 32);
    assert_eq!(
        u32::from_le_bytes(a.body[2..6].try_into().unwrap()) as usize,
        a.body.len()
    );
    assert_eq!(u16::from_le_bytes(a.body[28..30].try_into().unwrap()), 24);

    let upload = "/api/v1/mgmt/network/uploadBgCapture";
    assert_eq!(api(&phones, 0, "POST", upload, None).await, status("4003"));
    assert_eq!(
        api(
            &phones,
            0,
            "POST",
            "/api/v1/mgmt/config/set",
            Some(json!({"data": {
                "diags.pcap.enabled": "1",
                "diags.pcap.background.enabled": "1",
                "diags.pcap.background.filter": "udp port 5060",
                "diags.pcap.background.bufferSize": "2048",
            }}))
        )
        .await,
        ok()
    );
    assert_eq!(sim_state(&phones, 0).await["capturing"], true);
    assert_eq!(
        api(&phones, 0, "POST", upload, Some(json!({"data": {}}))).await,
        ok()
    );
    let s = sim_state(&phones, 0).await;
    assert_eq!(
        (
            s["captures_uploaded"].as_u64(),
            s["capture_filter"].as_str(),
            s["capturing"].as_bool()
        ),
        (Some(1), Some("udp port 5060"), Some(false))
    );
    // The file stays on the phone until capturing is turned off altogether.
    assert_eq!(api(&phones, 0, "POST", upload, None).await, ok());
    assert_eq!(
        api(
            &phones,
            0,
            "POST",
            "/api/v1/mgmt/config/set",
            Some(json!({"data": {"diags.pcap.enabled": "0"}}))
        )
        .await,
        ok()
    );
    assert_eq!(api(&phones, 0, "POST", upload, None).await, status("4003"));
    let (code, st) = api(&phones, 0, "GET", "/api/v1/mgmt/device/stats", None).await;
    assert_eq!(code, 200);
    assert!(st["data"]["CPU"]["Average"].is_string(), "{st}");
    assert!(st["data"]["Memory"]["Total"].is_string(), "{st}");
    phones.shutdown().await;
}

#[tokio::test]
async fn injected_faults() {
    let phones = fleet(3, [127, 0, 1, 80], |_| {}).await;
    let info = "/api/v1/mgmt/device/info";

    // error
    let v = sim_post(&phones, 0, "/sim/fault", json!({"mode": "error"})).await;
    assert_eq!(
        v,
        json!({"phone": "127.0.1.80", "mode": "error", "delay_ms": 2000})
    );
    assert_eq!(
        api(&phones, 0, "GET", info, None).await,
        (500, json!({"Status": "5000"}))
    );
    assert_eq!(api(&phones, 1, "GET", info, None).await.0, 200);

    // refuse: connections are reset; another phone's test API clears it.
    sim_post(
        &phones,
        1,
        "/sim/fault",
        json!({"mode": "refuse", "phone": "127.0.1.80"}),
    )
    .await;
    assert!(
        call(phones.addr(0), "GET", "/sim/state", None, None)
            .await
            .is_err()
    );
    sim_post(
        &phones,
        1,
        "/sim/fault",
        json!({"mode": "none", "phone": "127.0.1.80"}),
    )
    .await;
    assert_eq!(api(&phones, 0, "GET", info, None).await.0, 200);
    let a = call(
        phones.addr(1),
        "POST",
        "/sim/fault",
        None,
        Some(json!({"mode": "none", "phone": "127.0.9.9"})),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 404);
    let a = call(
        phones.addr(1),
        "POST",
        "/sim/fault",
        None,
        Some(json!({"mode": "sometimes"})),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 400);

    // hang: no answer while the fault lasts; the test API still answers.
    sim_post(&phones, 2, "/sim/fault", json!({"mode": "hang"})).await;
    let addr = phones.addr(2);
    let mut hung = tokio::spawn(async move { call(addr, "GET", info, Some(AUTH), None).await });
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(400), &mut hung).await {
        panic!(
            "a hanging phone answered: {:?}",
            r.map(|a| a.map(|a| a.status))
        );
    }
    assert_eq!(sim_state(&phones, 2).await["fault"]["mode"], "hang");
    sim_post(&phones, 2, "/sim/fault", json!({"mode": "none"})).await;
    assert_eq!(
        tokio::time::timeout(GUARD, hung)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .status,
        200
    );

    // slow, for everyone.
    let v = sim_post(
        &phones,
        0,
        "/sim/fault/all",
        json!({"mode": "slow", "delay_ms": 300}),
    )
    .await;
    assert_eq!(v["phones"], 3);
    let t = Instant::now();
    assert_eq!(api(&phones, 1, "GET", info, None).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    phones.shutdown().await;

    // --fault applies from the start.
    let phones = fleet(2, [127, 0, 1, 90], |o| o.fault = FaultMode::Refuse).await;
    assert!(
        call(phones.addr(1), "GET", "/sim/state", None, None)
            .await
            .is_err()
    );
    phones.shutdown().await;
}

#[tokio::test]
async fn tls_and_plain_http_on_one_port() {
    let phones = fleet(2, [127, 0, 2, 10], |_| {}).await;
    // The phone's own certificate, pinned: it names the MAC, not the address, so no CA check fits.
    let cfg = pinned_client_config(phones.certificate_der(1).unwrap());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(phones.addr(1)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.2.11").unwrap();
    let tls = tokio::time::timeout(GUARD, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(peer, phones.certificate_der(1).unwrap());
    let (_, cert) = x509_parser::parse_x509_certificate(&peer).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, phones.mac(1), "device certificates name the MAC");

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let a = send(
        &mut sender,
        "GET",
        "/api/v1/mgmt/device/info",
        Some(AUTH),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (a.status, a.json()["data"]["IPV4Address"].as_str()),
        (200, Some("127.0.2.11"))
    );
    // Keep-alive over TLS.
    let a = send(&mut sender, "GET", "/sim/state", None, None)
        .await
        .unwrap();
    assert_eq!(a.json()["mac"], "0004f2000001");

    // The same port answers plain HTTP.
    assert_eq!(
        api(&phones, 1, "GET", "/api/v1/mgmt/device/info", None)
            .await
            .0,
        200
    );
    let stats = phones.stats();
    assert_eq!((stats.tls_connections, stats.phones), (1, 2));
    phones.shutdown().await;
}

#[tokio::test]
async fn addresses_that_are_not_phones_are_refused() {
    let phones = fleet(2, [127, 0, 2, 20], |_| {}).await;
    let port = phones.port();
    for ip in [[127, 0, 2, 22], [127, 0, 2, 19]] {
        let addr = SocketAddr::from((ip, port));
        assert!(
            call(addr, "GET", "/sim/state", None, None).await.is_err(),
            "{addr}"
        );
    }
    assert_eq!(phones.stats().rejected_connections, 2);
    assert_eq!(phones.index_of("127.0.2.21".parse().unwrap()), Some(1));
    assert_eq!(phones.index_of("127.0.2.22".parse().unwrap()), None);
    assert_eq!(
        phones.addrs().collect::<Vec<_>>(),
        vec![
            SocketAddr::from(([127, 0, 2, 20], port)),
            SocketAddr::from(([127, 0, 2, 21], port))
        ]
    );
    phones.shutdown().await;
    // Shutdown frees the port.
    TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .expect("port still taken after shutdown");
}

#[test]
fn options_stay_on_loopback_unless_allowed() {
    let opts = |count: usize, base: [u8; 4]| PhonesOptions::new(count, Ipv4Addr::from(base));
    assert!(opts(1, [127, 0, 0, 1]).validate().is_ok());
    assert!(opts(50_000, [127, 1, 0, 1]).validate().is_ok());
    let err = opts(3, [127, 255, 255, 254])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("127.0.0.0/8") && err.contains("--allow-non-loopback"),
        "{err}"
    );
    let err = opts(1, [10, 0, 0, 5]).validate().unwrap_err().to_string();
    assert!(err.contains("loopback"), "{err}");
    let mut o = opts(1, [10, 0, 0, 5]);
    o.allow_non_loopback = true;
    assert!(o.validate().is_ok());
    assert!(opts(0, [127, 0, 0, 1]).validate().is_err());
    assert!(opts(MAX_PHONES + 1, [127, 0, 0, 1]).validate().is_err());
    let mut o = opts(3, [255, 255, 255, 254]);
    o.allow_non_loopback = true;
    assert!(
        o.validate()
            .unwrap_err()
            .to_string()
            .contains("255.255.255.255")
    );
}

#[tokio::test]
async fn refused_options_start_nothing() {
    let err = start(
        PhonesOptions::new(2, Ipv4Addr::new(192, 168, 1, 1)),
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("non-loopback phones started");
    assert!(err.to_string().contains("loopback"));
}

#[tokio::test]
async fn many_phones_answer_at_once() {
    let phones = fleet(2000, [127, 0, 3, 1], |_| {}).await;
    let port = phones.port();
    // 300 connections open at once (kept well under a 1024 descriptor limit, both ends counted),
    // each to its own phone, which must answer as itself.
    let tasks: Vec<_> = (0..300usize)
        .map(|i| {
            let idx = i * 6 + 1;
            let addr = SocketAddr::from((phones.ip(idx), port));
            tokio::spawn(async move {
                let a = call(addr, "GET", "/api/v1/mgmt/device/info", Some(AUTH), None)
                    .await
                    .unwrap();
                (idx, a.status, a.json()["data"]["MACAddress"].clone())
            })
        })
        .collect();
    for t in tasks {
        let (idx, status, mac) = t.await.unwrap();
        assert_eq!((status, mac), (200, json!(model::mac(idx))));
    }
    assert_eq!(phones.stats().requests, 300);
    phones.shutdown().await;
}

/// A TLS client that trusts exactly one certificate (and still checks the handshake signature).
/// Whether a TLS handshake with phone `idx` succeeds when its certificate must be `der`.
async fn handshake_with(phones: &Phones, idx: usize, der: Vec<u8>) -> bool {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pinned_client_config(der)));
    let tcp = TcpStream::connect(phones.addr(idx)).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(phones.ip(idx).into());
    tokio::time::timeout(GUARD, connector.connect(name, tcp))
        .await
        .unwrap()
        .is_ok()
}

#[tokio::test]
async fn each_phone_keeps_its_key_until_a_factory_reset_and_impostors_differ() {
    let phones = fleet(2, [127, 0, 4, 10], |o| {
        o.reboot_time = Duration::from_millis(100)
    })
    .await;
    let own = phones.certificate_der(0).unwrap();
    let key0 = phones.key_fingerprint(0).unwrap();
    assert_eq!(key0.len(), 64);
    assert_ne!(
        key0,
        phones.key_fingerprint(1).unwrap(),
        "one key per phone"
    );
    assert!(handshake_with(&phones, 0, own.clone()).await);
    assert_eq!(sim_state(&phones, 0).await["key_sha256"], key0);

    // A reboot keeps the key.
    phones.reboot(0);
    wait_up(&phones, 0).await;
    assert_eq!(phones.key_fingerprint(0).unwrap(), key0);
    assert!(handshake_with(&phones, 0, own.clone()).await);

    // An impostor at the address presents another key; the phone back presents its own again.
    sim_post(&phones, 0, "/sim/identity", json!({"swapped": true})).await;
    let impostor = phones.key_fingerprint(0).unwrap();
    assert_ne!(impostor, key0);
    assert!(!handshake_with(&phones, 0, own.clone()).await);
    assert_eq!(sim_state(&phones, 0).await["swapped"], true);
    sim_post(&phones, 0, "/sim/identity", json!({"swapped": false})).await;
    assert_eq!(phones.key_fingerprint(0).unwrap(), key0);
    assert!(handshake_with(&phones, 0, own.clone()).await);

    // A factory reset makes a new key.
    assert_eq!(
        api(&phones, 0, "POST", "/api/v1/mgmt/factoryReset", None).await,
        ok()
    );
    wait_up(&phones, 0).await;
    let reset = phones.key_fingerprint(0).unwrap();
    assert_ne!(reset, key0);
    assert_ne!(reset, impostor);
    assert!(!handshake_with(&phones, 0, own).await);
    assert_eq!(phones.state(0).key_generation, 1);
    phones.shutdown().await;
}

async fn wait_up(phones: &Phones, idx: usize) {
    let t = Instant::now();
    while phones.is_down(idx) {
        assert!(t.elapsed() < GUARD, "phone {idx} stays down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hostile_phones_answer_as_told() {
    let phones = fleet(1, [127, 0, 4, 50], |_| {}).await;
    let info = "/api/v1/mgmt/device/info";
    let lines = "/api/v1/mgmt/lineInfo";
    let set = |mode: &str| json!({ "mode": mode });

    sim_post(&phones, 0, "/sim/hostile", set("huge_replies")).await;
    let a = call(phones.addr(0), "GET", info, Some(AUTH), None)
        .await
        .unwrap();
    assert_eq!(a.body.len(), model::HUGE_REPLY);

    sim_post(&phones, 0, "/sim/hostile", set("long_strings")).await;
    let (_, v) = api(&phones, 0, "GET", info, None).await;
    assert!(v["data"]["ModelNumber"].as_str().unwrap().len() > 40_000);
    assert!(
        v["data"]["ModelNumber"]
            .as_str()
            .unwrap()
            .contains('\u{1b}')
    );

    sim_post(&phones, 0, "/sim/hostile", set("malformed")).await;
    let a = call(phones.addr(0), "GET", info, Some(AUTH), None)
        .await
        .unwrap();
    assert!(
        serde_json::from_slice::<Value>(&a.body).is_err(),
        "too deep to parse"
    );
    let a = call(
        phones.addr(0),
        "GET",
        "/api/v1/webCallControl/callStatus",
        Some(AUTH),
        None,
    )
    .await
    .unwrap();
    assert!(serde_json::from_slice::<Value>(&a.body).is_err());

    sim_post(&phones, 0, "/sim/hostile", set("many_lines")).await;
    let (_, v) = api(&phones, 0, "GET", lines, None).await;
    assert_eq!(v["data"].as_array().unwrap().len(), model::MANY_LINES);

    sim_post(&phones, 0, "/sim/hostile", set("flapping_lines")).await;
    let (_, a) = api(&phones, 0, "GET", lines, None).await;
    let (_, b) = api(&phones, 0, "GET", lines, None).await;
    assert_eq!(a["data"].as_array().unwrap().len(), model::FLAPPING_LINES);
    assert_ne!(
        a["data"][0]["RegistrationStatus"], b["data"][0]["RegistrationStatus"],
        "every answer flips"
    );

    sim_post(&phones, 0, "/sim/hostile", set("none")).await;
    let (_, v) = api(&phones, 0, "GET", lines, None).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(phones.stats().peak_in_flight >= 1);
    phones.shutdown().await;
}

fn pinned_client_config(der: Vec<u8>) -> rustls::ClientConfig {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Pinned(Vec<u8>, Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Pinned {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if end_entity.as_ref() == self.0.as_slice() {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General("not the pinned certificate".into()))
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(der, provider)))
        .with_no_client_auth()
}
