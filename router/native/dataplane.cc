// The router's native data plane: a gRPC C++ proxy for Triton's inference RPCs whose
// routing decisions are made by the Python router (router/dataplane.py).
//
// Why: grpcio's Python server and client cost ~0.7-0.9 ms of CPU per proxied request on
// this project's reference machine, several times what nginx needs for the same hop. Here
// the bytes of a request and of its responses never become Python objects except the
// request itself, once, for the routing parse; the policies, admission, health and
// metrics stay in Python, on the router's event loop.
//
// Protocol between the two halves (no Python is ever called from a gRPC thread):
//   C++ -> Python: events in a queue, signalled on an eventfd the event loop watches:
//     (0, id, request_bytes, metadata, time_remaining_s | None, streaming)   route it
//     (1, id, status_code, details, responses, latency_s, ttft_s | None, error_in_stream)
//                                                                         it ended
//     (2, id, status_code, details)      its instance failed before any response: route
//                                        it again (once) or reject it
//   Python -> C++: forward(id, address, request_id, model) or
//                  reject(id, status_code, message, request_id, model).
// Every request event Python answers with forward gets exactly one "ended" event, also
// when the client is gone by then, so the seat it took is always given back.
//
// Each routed request gets an upstream call of its own: a unary ModelInfer, or a
// ModelStreamInfer stream that carries just this request (written, then half-closed), so
// the end of that stream is the end of the request and no response needs parsing. All
// other methods are forwarded, unary, to the Python router's own gRPC server.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/channel_arguments.h>
#include <grpcpp/support/client_callback.h>
#include <grpcpp/support/server_callback.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using grpc::ByteBuffer;
using grpc::Status;
using grpc::StatusCode;
using Clock = std::chrono::steady_clock;
using Metadata = std::vector<std::pair<std::string, std::string>>;

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
constexpr char kModelStreamInfer[] = "/inference.GRPCInferenceService/ModelStreamInfer";

enum EventKind { kRoute = 0, kEnded = 1, kLost = 2 };

struct Event {
  EventKind kind;
  uint64_t id;
  std::string request;
  Metadata metadata;
  std::optional<double> time_remaining_s;
  bool streaming = false;
  int status = 0;
  std::string details;
  int responses = 0;
  double latency_s = 0;
  std::optional<double> ttft_s;
  bool error_in_stream = false;
};

std::string Flatten(const ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& slice : slices)
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return out;
}

ByteBuffer FromString(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return ByteBuffer(&slice, 1);
}

// A ModelStreamInferResponse's error_message is field 1: serialized first when set.
bool IsErrorResponse(const ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok() || slices.empty()) return false;
  for (const auto& slice : slices) {
    if (slice.size() != 0) return slice.begin()[0] == 0x0A;  // proto3 omits empty strings
  }
  return false;
}

void PutVarint(std::string* out, uint64_t value) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

void PutField(std::string* out, int field, const std::string& bytes) {
  PutVarint(out, (static_cast<uint64_t>(field) << 3) | 2);
  PutVarint(out, bytes.size());
  out->append(bytes);
}

// ModelStreamInferResponse{error_message, infer_response{model_name, id,
// parameters{"triton_final_response": bool_param true}}}: what Triton sends for a
// request that failed inside a stream, so clients end that request and keep the stream.
std::string StreamErrorResponse(const std::string& message, const std::string& request_id,
                                const std::string& model) {
  std::string bool_true("\x08\x01", 2);
  std::string entry;
  PutField(&entry, 1, "triton_final_response");
  PutField(&entry, 2, bool_true);
  std::string infer;
  if (!model.empty()) PutField(&infer, 1, model);
  if (!request_id.empty()) PutField(&infer, 3, request_id);
  PutField(&infer, 4, entry);
  std::string response;
  PutField(&response, 1, message);
  PutField(&response, 2, infer);
  return response;
}

Metadata ForwardedMetadata(const grpc::CallbackServerContext& context) {
  Metadata kept;
  for (const auto& [key, value] : context.client_metadata()) {
    std::string name(key.data(), key.size());
    if (name.rfind("grpc-", 0) == 0 || name.rfind(":", 0) == 0 || name == "user-agent")
      continue;
    kept.emplace_back(std::move(name), std::string(value.data(), value.size()));
  }
  return kept;
}

std::optional<double> TimeRemaining(const grpc::CallbackServerContext& context) {
  auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return std::nullopt;
  // gRPC reports "no deadline" as a far-future time point.
  double seconds = std::chrono::duration<double>(
      deadline - std::chrono::system_clock::now()).count();
  if (seconds > 1e8) return std::nullopt;
  return seconds;
}

class InferCall;

// Where a routed request's responses go: a unary RPC or a client's stream.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual void Relay(const ByteBuffer& response) = 0;
  // The request is over for good: `status` is its upstream's (or the router's) verdict.
  virtual void End(InferCall& call, const Status& status) = 0;
  virtual bool Cancelled() = 0;
};

class DataPlane;
DataPlane* g_plane = nullptr;  // set by start(), cleared by stop(); guarded by the GIL

// One routed request and its attempts upstream.
class InferCall : public std::enable_shared_from_this<InferCall> {
 public:
  InferCall(DataPlane* plane, Sink* sink, bool streaming, std::string request,
            Metadata metadata, std::chrono::system_clock::time_point deadline)
      : plane_(plane), sink_(sink), streaming_(streaming), request_(std::move(request)),
        metadata_(std::move(metadata)), deadline_(deadline), started_(Clock::now()) {}

  uint64_t id = 0;
  std::optional<double> time_remaining_s;
  bool streaming() const { return streaming_; }
  const std::string& request() const { return request_; }
  const Metadata& metadata() const { return metadata_; }

  void Forward(const std::string& address, std::string request_id, std::string model);
  void Reject(int code, const std::string& message, std::string request_id,
              std::string model);
  void Cancel() {
    grpc::ClientContext* context = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!contexts_.empty()) context = contexts_.back().get();
    }
    // Outside the lock: gRPC may run the upstream's completion on this thread.
    if (context != nullptr) context->TryCancel();
  }

  // From the upstream.
  void OnResponse(const ByteBuffer& response);
  void OnUpstreamDone(const Status& status);
  const ByteBuffer& unary_response() const { return unary_response_; }

  const std::string& request_id() const { return request_id_; }
  const std::string& model() const { return model_; }
  const std::string& address() const { return address_; }
  int responses() const { return responses_; }

 private:
  void Finish(const Status& status);

  DataPlane* plane_;
  Sink* sink_;
  bool streaming_;
  std::string request_;
  Metadata metadata_;
  std::chrono::system_clock::time_point deadline_;
  Clock::time_point started_;
  std::optional<Clock::time_point> first_response_;
  std::mutex mu_;
  // Contexts of every attempt stay alive with the call: gRPC may still touch the one of a
  // failed attempt while the retry starts.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;
  ByteBuffer request_buffer_;
  ByteBuffer unary_response_;
  std::string address_, request_id_, model_;
  std::atomic<int> responses_{0};
  std::atomic<bool> error_in_stream_{false};
  bool retried_ = false;
};

class DataPlane {
 public:
  DataPlane(std::string control_address, bool retry_on_failure)
      : control_address_(std::move(control_address)), retry_on_failure_(retry_on_failure) {
    eventfd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~DataPlane() {
    if (eventfd_ >= 0) close(eventfd_);
  }

  int eventfd_fd() const { return eventfd_; }
  bool retry_on_failure() const { return retry_on_failure_; }
  bool stopping() const { return stopping_.load(); }
  const std::string& control_address() const { return control_address_; }

  grpc::GenericStub* Stub(const std::string& address) {
    std::lock_guard<std::mutex> lock(stubs_mu_);
    auto& stub = stubs_[address];
    if (!stub) {
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(-1);
      args.SetMaxSendMessageSize(-1);
      stub = std::make_unique<grpc::GenericStub>(
          grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
    }
    return stub.get();
  }

  void Push(Event event) {
    bool was_empty;
    {
      std::lock_guard<std::mutex> lock(events_mu_);
      was_empty = events_.empty();
      events_.push_back(std::move(event));
    }
    if (was_empty) {
      uint64_t one = 1;
      ssize_t ignored = write(eventfd_, &one, sizeof(one));
      (void)ignored;
    }
  }

  std::vector<Event> TakeEvents() {
    std::vector<Event> taken;
    std::lock_guard<std::mutex> lock(events_mu_);
    taken.swap(events_);
    return taken;
  }

  // A request that needs a routing decision.
  void Submit(const std::shared_ptr<InferCall>& call) {
    {
      std::lock_guard<std::mutex> lock(calls_mu_);
      if (!stopping_) {
        call->id = next_id_++;
        awaiting_[call->id] = call;
        Event event{kRoute, call->id};
        event.request = call->request();
        event.metadata = call->metadata();
        event.streaming = call->streaming();
        event.time_remaining_s = call->time_remaining_s;
        Push(std::move(event));
        return;
      }
    }
    call->Reject(static_cast<int>(StatusCode::UNAVAILABLE), "the router is shutting down",
                 "", "");
  }

  // A failed attempt Python may route again.
  void AwaitRetry(const std::shared_ptr<InferCall>& call, const Status& status) {
    {
      std::lock_guard<std::mutex> lock(calls_mu_);
      if (!stopping_) {
        awaiting_[call->id] = call;
        Event event{kLost, call->id};
        event.status = status.error_code();
        event.details = status.error_message();
        Push(std::move(event));
        return;
      }
    }
    call->Reject(status.error_code(), status.error_message(), "", "");
  }

  std::shared_ptr<InferCall> Claim(uint64_t id) {
    std::lock_guard<std::mutex> lock(calls_mu_);
    auto found = awaiting_.find(id);
    if (found == awaiting_.end()) return nullptr;
    auto call = found->second;
    awaiting_.erase(found);
    return call;
  }

  // No new decisions will come: fail what waits for one.
  void StopRouting() {
    std::unordered_map<uint64_t, std::shared_ptr<InferCall>> waiting;
    {
      std::lock_guard<std::mutex> lock(calls_mu_);
      stopping_ = true;
      waiting.swap(awaiting_);
    }
    for (auto& [id, call] : waiting)
      call->Reject(static_cast<int>(StatusCode::UNAVAILABLE), "the router is shutting down",
                   "", "");
  }

  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::CallbackGenericService> service;

 private:
  int eventfd_ = -1;
  std::string control_address_;
  bool retry_on_failure_;
  std::atomic<bool> stopping_{false};
  std::mutex events_mu_;
  std::vector<Event> events_;
  std::mutex calls_mu_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<InferCall>> awaiting_;
  std::mutex stubs_mu_;
  std::map<std::string, std::unique_ptr<grpc::GenericStub>> stubs_;
};

// The upstream half of a streamed request: one ModelStreamInfer carrying only it.
class UpstreamStream : public grpc::ClientBidiReactor<ByteBuffer, ByteBuffer> {
 public:
  UpstreamStream(std::shared_ptr<InferCall> call, const ByteBuffer* request)
      : call_(std::move(call)), request_(request) {}

  void Start(grpc::GenericStub* stub, grpc::ClientContext* context) {
    stub->PrepareBidiStreamingCall(context, kModelStreamInfer, grpc::StubOptions(), this);
    StartWrite(request_);
    StartRead(&response_);
    StartCall();
  }
  void OnWriteDone(bool ok) override {
    if (ok) StartWritesDone();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    call_->OnResponse(response_);
    StartRead(&response_);
  }
  void OnDone(const Status& status) override {
    auto call = std::move(call_);
    delete this;
    call->OnUpstreamDone(status);
  }

 private:
  std::shared_ptr<InferCall> call_;
  const ByteBuffer* request_;
  ByteBuffer response_;
};

void InferCall::Forward(const std::string& address, std::string request_id,
                        std::string model) {
  if (sink_->Cancelled()) {
    Finish(Status(StatusCode::CANCELLED, "the client cancelled the request"));
    return;
  }
  grpc::ClientContext* context;
  {
    std::lock_guard<std::mutex> lock(mu_);
    address_ = address;
    request_id_ = std::move(request_id);
    model_ = std::move(model);
    contexts_.push_back(std::make_unique<grpc::ClientContext>());
    context = contexts_.back().get();
    if (request_buffer_.Length() == 0) request_buffer_ = FromString(request_);
  }
  for (const auto& [key, value] : metadata_) context->AddMetadata(key, value);
  if (deadline_ != std::chrono::system_clock::time_point::max())
    context->set_deadline(deadline_);
  grpc::GenericStub* stub = plane_->Stub(address);
  auto self = shared_from_this();
  if (streaming_) {
    (new UpstreamStream(self, &request_buffer_))->Start(stub, context);
  } else {
    stub->UnaryCall(context, kModelInfer, grpc::StubOptions(), &request_buffer_,
                    &unary_response_, [self](Status status) {
                      if (status.ok()) self->OnResponse(self->unary_response_);
                      self->OnUpstreamDone(status);
                    });
  }
  // A cancel that raced with the start: make sure the new attempt sees it.
  if (sink_->Cancelled()) Cancel();
}

void InferCall::Reject(int code, const std::string& message, std::string request_id,
                       std::string model) {
  request_id_ = std::move(request_id);
  model_ = std::move(model);
  // A rejected request never took a seat: the sink reports it, Python already knows.
  sink_->End(*this, Status(static_cast<StatusCode>(code), message));
}

void InferCall::OnResponse(const ByteBuffer& response) {
  if (responses_.fetch_add(1) == 0) first_response_ = Clock::now();
  if (streaming_) {
    if (IsErrorResponse(response)) error_in_stream_ = true;
    sink_->Relay(response);
  }
}

void InferCall::OnUpstreamDone(const Status& status) {
  bool retry = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    retry = !status.ok() && status.error_code() == StatusCode::UNAVAILABLE &&
            responses_ == 0 && !retried_ && plane_->retry_on_failure() &&
            !sink_->Cancelled();
    if (retry) retried_ = true;
  }
  if (retry) {
    plane_->AwaitRetry(shared_from_this(), status);
    return;
  }
  Finish(status);
}

// The request is over: tell Python (it frees the seat and records metrics), then the sink.
void InferCall::Finish(const Status& status) {
  Event event{kEnded, id};
  event.status = status.error_code();
  event.details = status.error_message();
  event.responses = responses_;
  auto now = Clock::now();
  event.latency_s = std::chrono::duration<double>(now - started_).count();
  if (first_response_)
    event.ttft_s = std::chrono::duration<double>(*first_response_ - started_).count();
  event.error_in_stream = error_in_stream_;
  plane_->Push(std::move(event));
  sink_->End(*this, status);
}

// Any unary method: ModelInfer is routed; everything else goes to the Python router.
class UnaryProxy : public grpc::ServerGenericBidiReactor, public Sink {
 public:
  UnaryProxy(DataPlane* plane, grpc::GenericCallbackServerContext* context)
      : plane_(plane), context_(context), routed_(context->method() == kModelInfer) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(Status(StatusCode::CANCELLED, "the client sent no request"));
      return;
    }
    if (routed_) {
      call_ = std::make_shared<InferCall>(plane_, this, false, Flatten(request_),
                                          ForwardedMetadata(*context_), context_->deadline());
      call_->time_remaining_s = TimeRemaining(*context_);
      {
        std::lock_guard<std::mutex> lock(mu_);
        submitted_ = call_;
      }
      plane_->Submit(call_);
      return;
    }
    auto upstream = std::make_unique<grpc::ClientContext>();
    for (const auto& [key, value] : ForwardedMetadata(*context_))
      upstream->AddMetadata(key, value);
    upstream->set_deadline(context_->deadline());
    grpc::ClientContext* started;
    {
      std::lock_guard<std::mutex> lock(mu_);
      upstream_context_ = std::move(upstream);
      started = upstream_context_.get();
    }
    plane_->Stub(plane_->control_address())
        ->UnaryCall(started, context_->method(), grpc::StubOptions(),
                    &request_, &response_, [this](Status status) { Reply(status, response_); });
  }

  void OnCancel() override {
    cancelled_ = true;
    std::shared_ptr<InferCall> call;
    grpc::ClientContext* upstream = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call = submitted_;
      upstream = upstream_context_.get();
    }
    if (call) call->Cancel();
    if (upstream != nullptr) upstream->TryCancel();
  }
  void OnWriteDone(bool) override {}
  void OnDone() override { delete this; }

  // Sink
  void Relay(const ByteBuffer&) override {}
  void End(InferCall& call, const Status& status) override {
    Reply(status, call.unary_response());
  }
  bool Cancelled() override { return cancelled_; }

 private:
  void Reply(const Status& status, const ByteBuffer& response) {
    if (status.ok()) {
      reply_ = response;
      StartWriteAndFinish(&reply_, grpc::WriteOptions(), Status::OK);
    } else {
      Finish(status);
    }
  }

  DataPlane* plane_;
  grpc::GenericCallbackServerContext* context_;
  bool routed_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  ByteBuffer request_, response_, reply_;
  std::shared_ptr<InferCall> call_;
  std::shared_ptr<InferCall> submitted_;  // call_, as OnCancel may read it (under mu_)
  std::unique_ptr<grpc::ClientContext> upstream_context_;
};

// A client's ModelStreamInfer: each request on it is routed on its own.
class StreamProxy : public grpc::ServerGenericBidiReactor, public Sink {
 public:
  StreamProxy(DataPlane* plane, grpc::GenericCallbackServerContext* context)
      : plane_(plane), context_(context), metadata_(ForwardedMetadata(*context)) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      {
        std::lock_guard<std::recursive_mutex> lock(mu_);
        reads_done_ = true;
      }
      Settle();
      return;
    }
    auto call = std::make_shared<InferCall>(plane_, this, true, Flatten(incoming_),
                                            metadata_, context_->deadline());
    call->time_remaining_s = TimeRemaining(*context_);
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      calls_.push_back(call);
    }
    plane_->Submit(call);
    StartRead(&incoming_);
  }

  void OnCancel() override {
    std::vector<std::shared_ptr<InferCall>> calls;
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      cancelled_ = true;
      calls = calls_;
    }
    for (auto& call : calls) call->Cancel();
    Settle();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      writing_ = false;
      if (!outbox_.empty()) outbox_.pop_front();
      if (!ok) cancelled_ = true;  // the client is gone: nobody reads the rest
      WriteNextLocked();
    }
    Settle();
  }

  void OnDone() override { delete this; }

  // Sink
  void Relay(const ByteBuffer& response) override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    if (cancelled_) return;
    outbox_.push_back(response);
    WriteNextLocked();
  }

  void End(InferCall& call, const Status& status) override {
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      if (!status.ok() && !cancelled_ && status.error_code() != StatusCode::CANCELLED) {
        outbox_.push_back(FromString(
            StreamErrorResponse(ErrorText(call, status), call.request_id(), call.model())));
        WriteNextLocked();
      }
      for (auto it = calls_.begin(); it != calls_.end(); ++it) {
        if (it->get() == &call) {
          calls_.erase(it);
          break;
        }
      }
    }
    Settle();
  }

  bool Cancelled() override {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    return cancelled_;
  }

 private:
  static std::string ErrorText(const InferCall& call, const Status& status) {
    if (call.address().empty() || status.error_code() != StatusCode::UNAVAILABLE)
      return status.error_message();
    if (call.responses() == 0)
      return "instance " + call.address() + " failed: " + status.error_message();
    return "instance " + call.address() + " failed after " + std::to_string(call.responses()) +
           " response(s) (" + status.error_message() + "); the request was not restarted";
  }

  void WriteNextLocked() {
    if (writing_ || outbox_.empty() || finished_ || cancelled_) return;
    writing_ = true;
    StartWrite(&outbox_.front());
  }

  // Finish once the client is done sending (or gone), every request has ended and every
  // response is written. Finish is called outside the lock: OnDone deletes this.
  void Settle() {
    std::optional<Status> verdict;
    {
      std::lock_guard<std::recursive_mutex> lock(mu_);
      if (finished_ || writing_ || !calls_.empty()) return;
      if (cancelled_) {
        verdict = Status(StatusCode::CANCELLED, "cancelled");
      } else if (reads_done_ && outbox_.empty()) {
        verdict = Status::OK;
      } else {
        return;
      }
      finished_ = true;
    }
    Finish(*verdict);
  }

  DataPlane* plane_;
  grpc::GenericCallbackServerContext* context_;
  Metadata metadata_;
  ByteBuffer incoming_;
  std::recursive_mutex mu_;
  std::vector<std::shared_ptr<InferCall>> calls_;
  std::deque<ByteBuffer> outbox_;
  bool writing_ = false, reads_done_ = false, cancelled_ = false, finished_ = false;
};

class Service : public grpc::CallbackGenericService {
 public:
  explicit Service(DataPlane* plane) : plane_(plane) {}
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    if (context->method() == kModelStreamInfer) return new StreamProxy(plane_, context);
    return new UnaryProxy(plane_, context);
  }

 private:
  DataPlane* plane_;
};

// ---- the Python module -----------------------------------------------------------------

PyObject* Start(PyObject*, PyObject* args) {
  const char* listen;
  const char* control;
  int retry_on_failure;
  if (!PyArg_ParseTuple(args, "ssp", &listen, &control, &retry_on_failure)) return nullptr;
  if (g_plane != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the native data plane is already running");
    return nullptr;
  }
  auto plane = std::make_unique<DataPlane>(control, retry_on_failure != 0);
  if (plane->eventfd_fd() < 0) return PyErr_SetFromErrno(PyExc_OSError);
  plane->service = std::make_unique<Service>(plane.get());
  int port = 0;
  {
    Py_BEGIN_ALLOW_THREADS
    grpc::ServerBuilder builder;
    builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
    builder.RegisterCallbackGenericService(plane->service.get());
    builder.SetMaxReceiveMessageSize(-1);
    builder.SetMaxSendMessageSize(-1);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    plane->server = builder.BuildAndStart();
    Py_END_ALLOW_THREADS
  }
  if (!plane->server || port == 0) {
    PyErr_Format(PyExc_OSError, "cannot listen on %s (in use?)", listen);
    return nullptr;
  }
  int fd = plane->eventfd_fd();
  g_plane = plane.release();
  return Py_BuildValue("(ii)", port, fd);
}

PyObject* OptionalFloat(const std::optional<double>& value) {
  if (value) return PyFloat_FromDouble(*value);
  Py_RETURN_NONE;
}

PyObject* EventTuple(const Event& event) {
  switch (event.kind) {
    case kRoute: {
      PyObject* metadata = PyTuple_New(static_cast<Py_ssize_t>(event.metadata.size()));
      if (metadata == nullptr) return nullptr;
      for (size_t i = 0; i < event.metadata.size(); ++i) {
        const auto& [key, value] = event.metadata[i];
        bool binary = key.size() > 4 && key.compare(key.size() - 4, 4, "-bin") == 0;
        PyObject* pair = binary ? Py_BuildValue("(s#y#)", key.data(), key.size(), value.data(),
                                                value.size())
                                : Py_BuildValue("(s#s#)", key.data(), key.size(), value.data(),
                                                value.size());
        if (pair == nullptr) {
          Py_DECREF(metadata);
          return nullptr;
        }
        PyTuple_SET_ITEM(metadata, static_cast<Py_ssize_t>(i), pair);
      }
      return Py_BuildValue("(iKy#NNO)", event.kind, event.id, event.request.data(),
                           event.request.size(), metadata, OptionalFloat(event.time_remaining_s),
                           event.streaming ? Py_True : Py_False);
    }
    case kEnded:
      return Py_BuildValue("(iKis#idNO)", event.kind, event.id, event.status,
                           event.details.data(), event.details.size(), event.responses,
                           event.latency_s, OptionalFloat(event.ttft_s),
                           event.error_in_stream ? Py_True : Py_False);
    case kLost:
      return Py_BuildValue("(iKis#)", event.kind, event.id, event.status,
                           event.details.data(), event.details.size());
  }
  Py_RETURN_NONE;
}

PyObject* TakeEvents(PyObject*, PyObject*) {
  if (g_plane == nullptr) return PyList_New(0);
  uint64_t counter;
  ssize_t ignored = read(g_plane->eventfd_fd(), &counter, sizeof(counter));
  (void)ignored;
  std::vector<Event> events = g_plane->TakeEvents();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(events.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < events.size(); ++i) {
    PyObject* item = EventTuple(events[i]);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* Forward(PyObject*, PyObject* args) {
  unsigned long long id;
  const char *address, *request_id, *model;
  if (!PyArg_ParseTuple(args, "Ksss", &id, &address, &request_id, &model)) return nullptr;
  if (g_plane == nullptr) Py_RETURN_FALSE;
  auto call = g_plane->Claim(id);
  if (!call) Py_RETURN_FALSE;
  std::string target(address), rid(request_id), name(model);
  Py_BEGIN_ALLOW_THREADS
  call->Forward(target, std::move(rid), std::move(name));
  Py_END_ALLOW_THREADS
  Py_RETURN_TRUE;
}

PyObject* Reject(PyObject*, PyObject* args) {
  unsigned long long id;
  int code;
  const char *message, *request_id, *model;
  if (!PyArg_ParseTuple(args, "Kisss", &id, &code, &message, &request_id, &model))
    return nullptr;
  if (g_plane == nullptr) Py_RETURN_FALSE;
  auto call = g_plane->Claim(id);
  if (!call) Py_RETURN_FALSE;
  std::string text(message), rid(request_id), name(model);
  Py_BEGIN_ALLOW_THREADS
  call->Reject(code, text, std::move(rid), std::move(name));
  Py_END_ALLOW_THREADS
  Py_RETURN_TRUE;
}

PyObject* Stop(PyObject*, PyObject* args) {
  double grace_s = 5.0;
  if (!PyArg_ParseTuple(args, "|d", &grace_s)) return nullptr;
  if (g_plane == nullptr) Py_RETURN_NONE;
  DataPlane* plane = g_plane;
  g_plane = nullptr;
  Py_BEGIN_ALLOW_THREADS
  plane->StopRouting();
  plane->server->Shutdown(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  plane->server->Wait();
  plane->server.reset();
  Py_END_ALLOW_THREADS
  // Channels and the plane itself are kept: a late callback may still run on them.
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"start", Start, METH_VARARGS,
     "start(listen_address, control_address, retry_on_failure) -> (port, eventfd)"},
    {"take_events", TakeEvents, METH_NOARGS, "take_events() -> list of event tuples"},
    {"forward", Forward, METH_VARARGS,
     "forward(id, address, request_id, model) -> bool: send a request to an instance"},
    {"reject", Reject, METH_VARARGS,
     "reject(id, status_code, message, request_id, model) -> bool: answer with an error"},
    {"stop", Stop, METH_VARARGS, "stop(grace_s=5.0): stop listening, finish what is running"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_dataplane",
                       "The router's native data plane (see router/dataplane.py).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__dataplane() { return PyModule_Create(&kModule); }
